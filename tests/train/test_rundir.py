"""Unattended runs: kill -9 and resume, kills while saving, SIGTERM/SIGINT, locks, NaN, bad input.

Kill and signal tests run the real CLI in a subprocess; the test callback `hooks.TestHooks`
(plugged in through `training.callbacks`) pauses it at a known step (or inside a checkpoint save)
and writes a marker file, so the tests are deterministic.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, TINY_GPT2, read_jsonl, sets
from hooks import CALLBACK, hook_env

TEXT = FIXTURES / "shakespeare_small.txt"
RUN = [*TINY_GPT2, f"data.train_file={TEXT}", "training.max_steps=12", "training.save_steps=4", "training.logging_steps=2"]


def args(out, *extra):
    return ["pretrain", *sets(*RUN, *extra), "-o", str(out)]


def start(out, tmp_path, **hooks):
    marker = tmp_path / "paused"
    env = hook_env(marker, **hooks)
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", *args(out, CALLBACK)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            out_, err = proc.communicate()
            pytest.fail(f"run ended before pausing (exit {proc.returncode}): {err.decode()}")
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from typer.testing import CliRunner

    from llmcli.cli import app

    out = tmp_path_factory.mktemp("clean") / "run"
    result = CliRunner().invoke(app, args(out), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return {**json.loads((out / "summary.json").read_text()), "dir": out}


def test_kill9_while_saving_resumes_from_the_previous_checkpoint_to_the_same_result(cli, tmp_path, uninterrupted):
    """kill -9 in the middle of writing checkpoint-8 (steps 2..8 logged): the half-written checkpoint
    never appears under its final name, and the same command resumes from checkpoint-4 to the result
    of an uninterrupted run."""
    out = tmp_path / "run"
    proc = start(out, tmp_path, PAUSE_IN_SAVE=8)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the half-written checkpoint is in .staging/, never under its final name
    assert (out / ".staging" / "checkpoint-8").is_dir() and not (out / "checkpoint-8").exists()
    assert (out / "checkpoint-4" / "trainer_state.json").exists() and not (out / "summary.json").exists()
    assert [e["step"] for e in read_jsonl(out / "metrics.jsonl")] == [2, 4, 6, 8]
    result = cli(*args(out))  # the same command again (the dead run's lock is taken over)
    assert "stale lock" in result.stderr and "resuming from" in result.stderr
    assert "removing incomplete checkpoint" in result.stderr and "checkpoint-8" in result.stderr
    assert not (out / ".staging").exists() and (out / "checkpoint-8" / "trainer_state.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["global_step"] == uninterrupted["global_step"] == 12
    # same model, optimizer, scheduler, RNG and data position: the result matches to float noise
    assert summary["eval_loss"] == pytest.approx(uninterrupted["eval_loss"], rel=1e-5)
    # metrics.jsonl was cut back to checkpoint-4 on resume: one record per step, the same losses
    resumed = [(e["step"], round(e["loss"], 4)) for e in read_jsonl(out / "metrics.jsonl") if "loss" in e]
    clean = [(e["step"], round(e["loss"], 4)) for e in read_jsonl(uninterrupted["dir"] / "metrics.jsonl") if "loss" in e]
    assert resumed == clean and [s for s, _ in resumed] == [2, 4, 6, 8, 10, 12]
    # the resumed session marks its start (the killed one wrote no end record): curves.png's resume line, and
    # the training time of both sessions, the killed one's up to its checkpoint
    from llmcli.train import curves

    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records if r.get("session_start")] == [4] and curves.resume_steps(records) == [4]
    at = next(i for i, r in enumerate(records) if r.get("session_start"))
    killed = [r["train_runtime"] for r in records[:at] if "train_runtime" in r]
    assert killed and all("train_loss" not in r for r in records[:at])
    final = [r["train_runtime"] for r in records[at:] if "train_loss" in r]
    assert curves.train_time(records, summary) == pytest.approx(killed[-1] + final[0], rel=1e-9)


def test_signal_checkpoints_then_exits(cli, tmp_path):
    """SIGTERM: checkpoint, exit 143, the rerun resumes. A first Ctrl-C takes the same path; the unit
    test below checks that SIGINT flags the step the same way and maps to 130 (`Interrupted`, which
    cli.py turns into the exit code), which saves a second process start."""
    out = tmp_path / "run"
    proc = start(out, tmp_path, PAUSE_AT_STEP=5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    err = err.decode()
    assert "stopped by SIGTERM at step 5" in err and "Traceback" not in err
    assert (out / "checkpoint-5" / "trainer_state.json").exists()
    assert not (out / ".llmcli.lock").exists()
    summary_run = cli(*args(out))
    assert "checkpoint-5" in summary_run.stderr
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 5


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_first_signal_asks_for_a_checkpoint_and_maps_to_its_exit_code(sig, code):
    """The guard the training loop installs: a first signal only flags the step (save, stop), and the
    stop it raises afterwards carries the shell's code for that signal (128 + signum)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from llmcli.errors import Interrupted
    from llmcli.train.hooks import GracefulStop

    guard, before = GracefulStop(), signal.getsignal(sig)
    with guard.installed():
        assert signal.getsignal(sig) == guard._handle
        signal.raise_signal(sig)  # the handler runs before this call returns
    assert signal.getsignal(sig) == before  # the previous handler is back
    control = TrainerControl()
    guard.on_step_end(TrainingArguments(output_dir="unused", report_to=[]), TrainerState(), control)
    assert guard.signum == sig and control.should_save and control.should_training_stop
    assert Interrupted(guard.signum, "stopped").exit_code == code


def test_second_sigint_exits_at_once_keeping_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    marker = tmp_path / "paused"
    proc = start(out, tmp_path, PAUSE_AT_STEP=5, PAUSE_IN_SAVE=5)  # paused after step 5
    marker.unlink()
    proc.send_signal(signal.SIGINT)  # first Ctrl-C: save a checkpoint at step 5 ... which pauses mid-save
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # second Ctrl-C: out now
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "second interrupt" in err.decode()
    assert (out / "checkpoint-4" / "trainer_state.json").exists() and not (out / "checkpoint-5").exists()


def test_save_total_limit_rotates_renamed_checkpoints(cli, tmp_path):
    out = tmp_path / "run"
    cli(*args(out, "training.save_steps=2", "training.save_total_limit=2", "training.max_steps=8"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert not (out / ".staging").exists()


def test_second_run_into_a_locked_dir_exits_75(cli, tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".llmcli.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2026-01-01T00:00:00"}))
    with open(lock) as held:  # a live holder: the flock is what counts, the file's contents only name it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = cli(*args(out), expect=75)
    assert f"pid {os.getpid()}" in result.stderr and socket.gethostname() in result.stderr and "2026-01-01" in result.stderr
    assert lock.exists() and json.loads(lock.read_text())["started"] == "2026-01-01T00:00:00"  # the holder's lock is untouched
    assert not (out / "config.yaml").exists()


def test_stale_lock_is_taken_over(cli, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".llmcli.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    result = cli(*args(out, "training.max_steps=1"))
    assert "taking over stale lock" in result.stderr
    assert not (out / ".llmcli.lock").exists()


def test_nan_loss_stops_with_exit_1_and_keeps_the_last_checkpoint(cli, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("HOOK_NAN_AT_STEP", "7")
    result = cli(*args(out, CALLBACK), expect=1)
    assert "loss became nan at step 7" in result.stderr and "checkpoint-4" in result.stderr
    assert (out / "checkpoint-4" / "trainer_state.json").exists()
    assert not (out / "checkpoint-8").exists()
    failed = json.loads((out / "summary.json").read_text())  # `llmcli report` and cron see a failed run
    assert failed["status"] == "failed" and failed["global_step"] == 6 and "loss became nan" in failed["error"]
    monkeypatch.delenv("HOOK_NAN_AT_STEP")
    cli(*args(out))  # resumes from the good checkpoint
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 4


def _bad_cases(tmp: Path):
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.txt").write_text("\n\n  \n")
    (tmp / "data.docx").write_text("x")
    (tmp / "latin1.txt").write_bytes("line one\nline two\ncaf\xe9\n".encode("latin-1"))
    (tmp / "rows.jsonl").write_text('{"body": "a", "title": "t"}\n{"body": "b", "title": "u"}\n')
    (tmp / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp / "bad.yaml").write_text("training:\n  max_steps: [1\n")
    (tmp / "noweights").mkdir()
    (tmp / "noweights" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    text = f"data.train_file={TEXT}"
    return [
        # (extra args, exit code, message)
        ([f"data.train_file={tmp / 'empty.txt'}"], 4, "empty.txt: file is empty"),
        ([f"data.train_file={tmp / 'blank.txt'}"], 4, "holds only blank lines"),
        ([f"data.train_file={tmp / 'missing.txt'}"], 4, "data.train_file: file not found"),
        ([f"data.train_file={tmp / 'data.docx'}"], 4, "unsupported extension '.docx'"),
        ([f"data.train_file={tmp / 'latin1.txt'}"], 4, "latin1.txt:3: not valid UTF-8"),
        ([f"data.train_file={tmp / 'rows.jsonl'}"], 4, "data.text_column is not set and no obvious column exists; the data has columns: body, title"),
        ([f"data.train_file={tmp / 'rows.jsonl'}", "data.text_column=text"], 4, "column 'text' not found; the data has columns: body, title"),
        ([f"data.train_file={tmp / 'broken.jsonl'}"], 4, "broken.jsonl:2: malformed JSON line"),
        ([text, "data.block_size=4096"], 2, "data.block_size=4096 is larger than the model's context (128"),
        ([text, "training.max_steps=many"], 2, "config key 'training.max_steps': expected int"),
        ([text, "training.learning_rat=1"], 2, "did you mean 'learning_rate'"),
        ([text, "model.config_overrides.n_layers=2"], 2, "unknown config key 'model.config_overrides.n_layers' for gpt2 (did you mean 'n_layer'?)"),
        ([text, f"model.model_name_or_path={tmp / 'noweights'}"], 2, "holds no weights"),
        ([text, f"model.model_name_or_path={tmp / 'nowhere'}"], 2, "model path not found"),
        (["--config", str(tmp / "bad.yaml")], 2, "bad.yaml:3:1: YAML syntax error"),
    ]


def test_bad_inputs_give_one_line_and_an_exit_code(cli, tmp_path):
    taken = 0
    for i, (extra, code, message) in enumerate(_bad_cases(tmp_path)):
        flags = extra if extra[0].startswith("--") else sets(*extra)
        out = tmp_path / f"out{i}"
        result = cli("pretrain", *sets(*TINY_GPT2, "training.max_steps=1"), *flags, "-o", out, expect=None)
        assert result.exit_code == code, (extra, result.exit_code, result.stderr)
        assert message in result.stderr, (extra, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0] and "Traceback" not in result.stderr
        if (out / "config.yaml").exists():  # found once the run dir was taken: the run is recorded as failed
            summary = json.loads((out / "summary.json").read_text())
            assert summary["status"] == "failed" and message in summary["error"] and summary["global_step"] == 0, extra
            taken += 1
        else:
            assert not (out / "summary.json").exists(), extra
    assert taken == 6  # blank or non-UTF-8 text, columns, malformed JSON and the block size: found while building the run


def test_negative_int_labels_and_labels_outside_a_classifier(cli, bert_run, tmp_path):
    (tmp_path / "neg.tsv").write_text("sentence\tlabel\ngood\t1\nbad\t-1\n")
    result = cli("finetune", "--model", bert_run, *sets(f"data.train_file={tmp_path / 'neg.tsv'}", "training.max_steps=1"),
                 "-o", tmp_path / "o", expect=4)
    assert "integer labels must be 0..K-1, found -1" in result.stderr


def test_tokenizer_larger_than_the_model_vocabulary(cli, gpt2_run, tmp_path):
    big = tmp_path / "bigtok"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gpt2_run)
    tok.add_tokens([f"<extra_{i}>" for i in range(500)])
    tok.save_pretrained(big)
    result = cli("finetune", "--model", gpt2_run, *sets(f"data.train_file={TEXT}", f"model.tokenizer_name={big}", "training.max_steps=1"),
                 "-o", tmp_path / "o2", expect=2)
    assert "tokenizer has" in result.stderr and "embedding has" in result.stderr


def test_unwritable_output_dir_fails_before_training(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli(*args(blocker / "run"), expect=2)
    assert "cannot create output dir" in result.stderr and str(blocker) in result.stderr


def test_pickle_only_checkpoint_needs_opt_in(cli, gpt2_run, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    pkl = tmp_path / "pkl"
    shutil.copytree(gpt2_run, pkl, ignore=shutil.ignore_patterns("checkpoint-*", "*.safetensors"))
    torch.save(load_file(gpt2_run / "model.safetensors"), pkl / "pytorch_model.bin")
    result = cli("generate", "--model", pkl, "--prompt", "x", expect=2)
    assert "only pickle weights" in result.stderr and "model.allow_pickle=true" in result.stderr
    ok = cli("generate", "--model", pkl, "--prompt", "ROMEO:", "--max-new-tokens", "4", "--set", "model.allow_pickle=true")
    assert ok.stdout.strip()


# --------------------------------------------------------------------------------------------
# Run-dir decisions: fast unit tests (no training)


def _checkpoint(run, step, *weights):
    ckpt = run / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    for name in weights:
        (ckpt / name).mkdir() if "." not in name else (ckpt / name).write_text("x")
    return ckpt


def test_completeness_rule_accepts_sharded_checkpoints(tmp_path):
    from llmcli.layout import checkpoint_is_complete, latest_checkpoint
    from llmcli.train.rundir import prepare_run_dir

    fsdp = _checkpoint(tmp_path, 4, "pytorch_model_fsdp_0", "optimizer_0")  # FSDP SHARDED_STATE_DICT layout
    deepspeed = _checkpoint(tmp_path, 8, "global_step8")
    assert checkpoint_is_complete(fsdp) and checkpoint_is_complete(deepspeed)
    no_weights = _checkpoint(tmp_path, 12)
    assert not checkpoint_is_complete(no_weights)
    # resuming removes only the incomplete one and resumes from the sharded DeepSpeed checkpoint
    assert prepare_run_dir(tmp_path, resume=True, overwrite=False) == deepspeed
    assert fsdp.exists() and not no_weights.exists()
    assert latest_checkpoint(tmp_path) == deepspeed


def test_overwrite_deletes_only_what_llmcli_wrote(tmp_path):
    from llmcli.errors import ConfigError
    from llmcli.train.rundir import prepare_run_dir

    run = tmp_path / "run"
    _checkpoint(run, 2, "model.safetensors")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.safetensors", "tokenizer.json", "config.json"):
        (run / name).write_text("x")
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    with pytest.raises(ConfigError, match=r"holds files llmcli did not write \(data, notes.txt\)"):
        prepare_run_dir(run, resume=False, overwrite=True)
    assert (run / "checkpoint-2").exists() and (run / "summary.json").exists()  # nothing deleted
    (run / "notes.txt").unlink()
    (run / "data").rmdir()
    assert prepare_run_dir(run, resume=False, overwrite=True) is None
    assert list(run.iterdir()) == []


def test_overwrite_never_deletes_the_model_being_finetuned(tmp_path):
    from llmcli.errors import ConfigError
    from llmcli.train.rundir import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_text("x")
    with pytest.raises(ConfigError, match="would delete the model being fine-tuned"):
        prepare_run_dir(run, resume=True, overwrite=True, protect=str(run))
    assert (run / "model.safetensors").exists()


def test_fresh_start_drops_the_metrics_of_a_run_killed_before_its_first_checkpoint(cli, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 99.0}) + "\n")
    (out / "config.yaml").write_text("{}\n")
    cli(*args(out, "training.max_steps=4", "training.save_steps=1000"))
    steps = [e["step"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e]
    assert steps == [2, 4] and all(e.get("loss") != 99.0 for e in read_jsonl(out / "metrics.jsonl"))


@pytest.mark.parametrize("max_steps", [3, 4])  # mid-epoch and the end of an epoch (64 blocks, batch 32: 2 steps per epoch)
def test_rerunning_a_finished_run_is_a_no_op(cli, tmp_path, max_steps):
    out = tmp_path / "run"
    run_args = args(out, f"training.max_steps={max_steps}", "training.save_steps=2", "training.per_device_train_batch_size=32",
                    "data.max_train_samples=64")
    cli(*run_args)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    summary = (out / "summary.json").read_text()
    result = cli(*run_args)
    assert "already holds this run, finished at step" in result.stderr
    assert (out / "summary.json").read_text() == summary
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert json.loads(summary)["global_step"] == max_steps


def test_two_concurrent_takeovers_of_a_stale_lock_have_one_winner(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".llmcli.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "x"}))
    go = tmp_path / "go"
    script = (
        "import os, sys, time, pathlib\n"
        "from llmcli.train.rundir import RunLock\n"
        "from llmcli.errors import LockedError\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.001)\n"
        f"try:\n    RunLock(pathlib.Path({str(run)!r})).acquire(); print('won', flush=True); time.sleep(2)\n"
        "except LockedError:\n    print('lost', flush=True)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    time.sleep(1.5)
    go.write_text("")
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["lost", "lost", "lost", "won"]


def test_an_error_after_the_run_dir_is_taken_is_recorded_as_failed(cli, tmp_path):
    """Building the Trainer's callbacks fails after the lock, config.yaml and data: summary.json says
    failed (not "interrupted at step 0", which invites a rerun that fails the same way), and a rerun
    after fixing the config starts over."""
    out = tmp_path / "run"
    result = cli(*args(out, "training.callbacks=[hooks:Unbuildable]"), expect=1)
    assert result.stderr.strip().endswith("RuntimeError: this callback cannot be built (rerun with --debug for the traceback)")
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {"status": "failed", "error": "this callback cannot be built", "task": "causal-lm", "global_step": 0}
    assert json.loads(cli("report", out, "--json").stdout)["runs"][0]["status"] == "failed"
    cli(*args(out))
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
