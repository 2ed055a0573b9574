"""Fine-tuning batches rows of similar length together (Trainer's group_by_length sampler) by default: less
padding than random batches, recorded in the run's config.yaml, and a run killed with -9 resumes to the result of
an uninterrupted one (the sampler's order is part of the data position)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import read_jsonl, sets
from hooks import CALLBACK, hook_env

WORDS = "the film is a warm , funny and moving story but its second half feels long dull and badly acted".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """96 rows of 1 to 24 words (labels by a word the row holds), and a dev set."""
    folder = tmp_path_factory.mktemp("lengths")
    start = [i % len(WORDS) for i in range(96)]
    rows = [{"text": " ".join((WORDS * 2)[s : s + 1 + (i * 5) % 24]), "label": int(i % 3 == 0)} for i, s in enumerate(start)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    return folder


def args(bert_run, data, out, *extra):
    return ["finetune", "--model", str(bert_run), *sets(
        f"data.train_file={data / 'train.jsonl'}", f"data.validation_file={data / 'dev.jsonl'}", "data.max_seq_length=32",
        "training.max_steps=12", "training.save_steps=4", "training.logging_steps=2", "training.per_device_train_batch_size=8",
        "training.learning_rate=2e-3", "training.seed=0", "training.curves=false", "training.include_num_input_tokens_seen=all",
        *extra), "-o", str(out)]


def tokens_seen(out):
    """Trainer's count of every token fed (padding included) after the last step."""
    return [r["num_input_tokens_seen"] for r in read_jsonl(out / "metrics.jsonl") if "num_input_tokens_seen" in r][-1]


def test_grouped_batches_pad_less_and_resume_after_kill9_to_the_same_result(cli, bert_run, data, tmp_path):
    from transformers import AutoTokenizer

    grouped, shuffled = tmp_path / "grouped", tmp_path / "random"
    cli(*args(bert_run, data, grouped))
    cli(*args(bert_run, data, shuffled, "training.train_sampling_strategy=random"))
    assert yaml.safe_load((grouped / "config.yaml").read_text())["training"]["train_sampling_strategy"] == "group_by_length"
    assert yaml.safe_load((shuffled / "config.yaml").read_text())["training"]["train_sampling_strategy"] == "random"

    tok = AutoTokenizer.from_pretrained(bert_run)
    real = sum(len(ids) for ids in tok([r["text"] for r in read_jsonl(data / "train.jsonl")], truncation=True, max_length=32)["input_ids"])
    padding = {name: tokens_seen(out) - real for name, out in (("grouped", grouped), ("random", shuffled))}
    # 12 steps x 8 rows: every row once; grouped, less than half the padding of random batches (741 -> 341 here)
    assert padding["random"] > 0 and padding["grouped"] < padding["random"] / 2, padding

    killed, marker = tmp_path / "killed", tmp_path / "paused"
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", *args(bert_run, data, killed, CALLBACK)],
                            env=hook_env(marker, PAUSE_AT_STEP=6), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1].decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint-4").is_dir() and not (killed / "summary.json").exists()
    cli(*args(bert_run, data, killed))
    resumed, clean = (json.loads((out / "summary.json").read_text()) for out in (killed, grouped))
    assert resumed["resumed_from"] == 4 and resumed["global_step"] == clean["global_step"] == 12
    assert resumed["eval_loss"] == pytest.approx(clean["eval_loss"], rel=1e-5)
    losses = [[(e["step"], round(e["loss"], 5)) for e in read_jsonl(out / "metrics.jsonl") if "loss" in e] for out in (killed, grouped)]
    assert losses[0] == losses[1] and [s for s, _ in losses[0]] == [2, 4, 6, 8, 10, 12]
    assert tokens_seen(killed) == tokens_seen(grouped)  # the same batches, in the same order
