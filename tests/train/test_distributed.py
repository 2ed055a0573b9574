"""Several processes through accelerate (gloo ranks on CPU), streaming, and the data cache keys."""

import json
import os
import subprocess
import sys

import pytest

from conftest import FIXTURES, TINY_BERT, TINY_GPT2, read_jsonl, sets

TEXT = FIXTURES / "shakespeare_small.txt"
# dropout off so that 1 process x batch 8 and 2 processes x batch 4 compute the same steps
DETERMINISTIC = [*TINY_GPT2, f"data.train_file={TEXT}", "training.max_steps=8", "model.config_overrides.resid_pdrop=0",
                 "model.config_overrides.embd_pdrop=0", "model.config_overrides.attn_pdrop=0", "training.save_steps=4"]

# SGD, not Adam: Adam turns float noise in a near-zero gradient into a full-size step, so runs that split a
# batch differently drift apart (3.6e-5 in eval loss after 8 steps); with SGD noise stays noise
SGD = ["training.optim=sgd", "training.learning_rate=0.05", "training.logging_steps=1"]
# a classifier whose runs compute the same arithmetic whatever the batch split
SGD_CLASSIFIER = [f"data.train_file={FIXTURES / 'sentiment_train.jsonl'}", f"data.validation_file={FIXTURES / 'sentiment_dev.jsonl'}",
                  "data.label_column=sentiment", "data.max_seq_length=32", "training.max_steps=6", "training.seed=0",
                  *SGD, "training.learning_rate=0.5", "training.curves=false",
                  "model.config_overrides.hidden_dropout_prob=0", "model.config_overrides.attention_probs_dropout_prob=0"]


def layout(run_dir):
    return sorted(p.name for p in run_dir.iterdir())


def _launch(*args, timeout=300, env=None):
    """`accelerate launch` itself (not llmcli's `--num-processes` relaunch): 2 gloo ranks on the CPU."""
    from llmcli.train.launch import free_port  # xdist workers may launch at the same time

    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "llmcli",
                           *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_streaming_trains_without_caching_the_corpus(cli, gpt2_run, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCLI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "stream"
    result = cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={TEXT}", "data.streaming=true", f"model.tokenizer_name={gpt2_run}",
                 "training.max_steps=6"), "-o", out)
    assert "streamed blocks" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["train_tokens"] == 6 * 8 * 32
    assert not (tmp_path / "cache" / "tokenized").exists()
    result = cli("pretrain", *sets(*TINY_GPT2, f"data.train_file={TEXT}", "data.streaming=true", f"model.tokenizer_name={gpt2_run}"),
                 "-o", tmp_path / "x", expect=2)
    assert "needs training.max_steps" in result.stderr


def test_cache_key_follows_the_tokenizer(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCLI_CACHE", str(tmp_path / "cache"))
    base = [*TINY_GPT2, f"data.train_file={TEXT}", "training.max_steps=1"]
    assert "cache miss" in cli("pretrain", *sets(*base), "-o", tmp_path / "a").stderr
    assert "tokenized cache hit" in cli("pretrain", *sets(*base), "-o", tmp_path / "b").stderr
    other = cli("pretrain", *sets(*base, "model.vocab_size=280"), "-o", tmp_path / "c").stderr
    assert "training a bpe tokenizer (vocab_size=280)" in other and "cache miss" in other
    assert len(os.listdir(tmp_path / "cache" / "tokenized")) == 2


def test_classifier_eval_under_two_processes_matches_one(cli, classifier_run):
    """Each rank scores its share of the examples; the main process reports the reduced metrics once."""
    args = ("eval", "--model", classifier_run, "--data", FIXTURES / "sentiment_dev.jsonl", "--set", "data.label_column=sentiment", "--json")
    one = json.loads(cli(*args).stdout)["metrics"]
    proc = _launch(*args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # reported once, by the main process
    two = json.loads(lines[0])["metrics"]
    assert two["examples"] == one["examples"] == 40
    assert two == one  # counts: the confusion matrix, per-class support, and what follows from them


def test_sigterm_to_two_processes_then_resumed_they_match_one_process(cli, tmp_path):
    """`llmcli --num-processes 2` (2 gloo ranks, per-device batch 4): SIGTERM to the parent reaches both workers,
    which stop at the same step, save one checkpoint and exit 143; the parent exits 143 too (not the launcher's 1).
    `accelerate launch -m llmcli` with the same arguments resumes it, and the run computes what one uninterrupted
    process with batch 8 does: the same loss at every step and the same eval loss, at float noise (SGD). The eval
    batches divide the 44 validation blocks evenly (2 x 11, 1 x 22): otherwise accelerate pads the last batch with
    repeated blocks and Trainer's eval_loss drifts (1.9e-4 relative with 2 x 16; README)."""
    import signal
    import time
    from hooks import CALLBACK, hook_env

    one = tmp_path / "one"
    cli("pretrain", *sets(*DETERMINISTIC, *SGD, "training.per_device_train_batch_size=8", "training.per_device_eval_batch_size=22"), "-o", one)
    two, marker = tmp_path / "two", tmp_path / "paused"
    env = {**hook_env(marker, PAUSE_AT_STEP=3), "LLMCLI_CACHE": str(tmp_path / "cache")}
    args = ["pretrain", *sets(*DETERMINISTIC, *SGD, "training.per_device_train_batch_size=4", "training.per_device_eval_batch_size=11", CALLBACK),
            "-o", str(two)]
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", *args, "--num-processes", "2"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    assert "launching 2 processes" in err and "stopped by SIGTERM at step 3" in err and "Traceback" not in err and "ChildFailedError" not in err
    assert (two / "checkpoint-3" / "trainer_state.json").exists()
    # each rank's RNG state made it into the checkpoint (the resumed rank 1 gets its own back)
    assert {p.name for p in (two / "checkpoint-3").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert err.count("built gpt2 from scratch") == 1  # only the main process talks
    env.pop("HOOK_PAUSE_AT_STEP")
    rerun = _launch(*args, env=env)
    assert rerun.returncode == 0, rerun.stderr
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    assert s2["resumed_from"] == 3 and s2["global_step"] == s1["global_step"] == 8
    assert s2["train_tokens"] == s1["train_tokens"] == 8 * 8 * 32  # global batch = 2 x per-device 4
    losses = [[e["loss"] for e in read_jsonl(d / "metrics.jsonl") if "loss" in e] for d in (one, two)]
    assert len(losses[0]) == 8 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-5)
    assert layout(two) == sorted(["checkpoint-3", *layout(one)]) and not (two / ".llmcli.lock").exists()  # and the signal's checkpoint
    assert {p.name for p in (two / "checkpoint-8").glob("rng_state*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    entries = os.listdir(tmp_path / "cache" / "tokenized")
    assert len(entries) == 1 and not any(e.startswith(".") for e in entries)  # tokenized once, no leftovers


def _stop_flag_worker(rank, store_path, results):
    import signal

    import torch
    import torch.distributed as dist
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from llmcli.train.hooks import GracefulStop

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", store=dist.FileStore(store_path, 2), rank=rank, world_size=2)
    guard = GracefulStop()
    if rank == 1:
        guard._handle(signal.SIGTERM, None)  # only rank 1 sees the signal
    control = TrainerControl()
    guard.on_step_end(SimpleNamespace(device=torch.device("cpu")), TrainerState(), control)
    results[rank] = (guard.signum, control.should_save, control.should_training_stop, torch.distributed.get_rank())
    dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    import signal

    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    # forked, not spawned: the ranks inherit this process's imports (a spawned rank re-imports torch and
    # transformers, ~10 s each); nothing here has started threads that the ranks need
    mp.start_processes(_stop_flag_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True, start_method="fork")
    assert dict(results) == {0: (signal.SIGTERM, True, True, 0), 1: (signal.SIGTERM, True, True, 1)}


def test_classifier_finetune_two_processes_match_one(cli, bert_run, tmp_path):
    """2 ranks x batch 8 == 1 process x batch 16 (SGD, dropout off: the same arithmetic up to float order).
    Transformers' Trainer multiplied a classifier's loss and gradient by the number of processes (its head
    ignores `num_items_in_batch`): the 2-rank run reported twice the loss."""
    one, two = tmp_path / "one", tmp_path / "two"
    cli("finetune", "--model", bert_run, *sets(*SGD_CLASSIFIER, "training.per_device_train_batch_size=16"), "-o", one)
    proc = _launch("finetune", "--model", bert_run, *sets(*SGD_CLASSIFIER, "training.per_device_train_batch_size=8"), "-o", two,
                   env={**os.environ, "LLMCLI_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    for key in ("train_loss", "eval_loss"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-5), key
    assert [sum(map(sum, s["confusion_matrix"]["matrix"])) for s in (s1, s2)] == [40, 40]  # every dev example once


def test_classifier_gradient_accumulation_matches_one_batch(cli, bert_run, tmp_path):
    """Batch 8 x 2 accumulation steps == batch 16 (the Trainer skipped the division by the accumulation
    steps for a classifier's head, which ignores `num_items_in_batch`: twice the loss and gradient)."""
    one, acc = tmp_path / "one", tmp_path / "acc"
    cli("finetune", "--model", bert_run, *sets(*SGD_CLASSIFIER, "training.per_device_train_batch_size=16"), "-o", one)
    cli("finetune", "--model", bert_run, *sets(*SGD_CLASSIFIER, "training.per_device_train_batch_size=8",
                                                "training.gradient_accumulation_steps=2"), "-o", acc)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, acc))
    losses = [[e["loss"] for e in read_jsonl(d / "metrics.jsonl") if "loss" in e] for d in (one, acc)]
    assert len(losses[0]) == len(losses[1]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    for key in ("train_loss", "eval_loss"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-5), key


def test_masked_lm_loss_is_not_scaled_by_accumulation_steps(cli, tmp_path):
    """The same rule for BERT's masked-LM head (a batch mean as well): with 2 accumulation steps the
    reported loss was twice the loss (11.85 vs 5.93 here). Not compared at float noise: the collator
    draws the masks per batch, so batch 16 and 2 x 8 mask different tokens."""
    runs = {}
    for ga in (1, 2):
        runs[ga] = tmp_path / f"ga{ga}"
        cli("pretrain", *sets(*TINY_BERT, f"data.train_file={TEXT}", "training.max_steps=10", "training.logging_steps=10",
                              f"training.per_device_train_batch_size={16 // ga}", f"training.gradient_accumulation_steps={ga}"),
            "-o", runs[ga])
    one, two = (json.loads((runs[ga] / "summary.json").read_text())["train_loss"] for ga in (1, 2))
    assert two == pytest.approx(one, rel=0.02)  # measured 5.9228 vs 5.9257 (5e-4); the bug gave 2x
