"""The GRU through every command, as any architecture registered in llmcli.models would go."""

import json

import pytest

from conftest import FIXTURES, TINY_GRU, read_jsonl, sets

TEXT = FIXTURES / "shakespeare_small.txt"


@pytest.fixture(scope="module")
def gru_run(tmp_path_factory):
    from typer.testing import CliRunner

    from llmcli.cli import app

    out = tmp_path_factory.mktemp("gru") / "run"
    result = CliRunner().invoke(app, ["pretrain", *sets(*TINY_GRU, "training.max_steps=30", "training.save_steps=10"), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    return out


def test_pretrain_trains_a_bpe_gru_and_saves_a_loadable_model(gru_run):
    import llmcli.models
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = json.loads((gru_run / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and summary["global_step"] == 30
    losses = [e["loss"] for e in read_jsonl(gru_run / "metrics.jsonl") if "loss" in e]
    assert losses[-1] < losses[0] - 1.0
    llmcli.models.register()
    model = AutoModelForCausalLM.from_pretrained(gru_run)
    assert type(model).__name__ == "GRUForCausalLM" and model.config.model_type == "gru"
    assert type(AutoTokenizer.from_pretrained(gru_run).backend_tokenizer.model).__name__ == "BPE"  # GPT-2 style, not WordPiece


def test_generate_batched_equals_single_and_long_prompts_are_not_cut(cli, gru_run):
    prompts = "ROMEO:\nTo be\nWhat light through yonder window breaks, and\n" + ("all the world " * 30) + "\n"
    outs = [cli("generate", "--model", gru_run, "--temperature", "0", "--max-new-tokens", "8", "-b", str(b), input=prompts).stdout
            for b in (1, 2, 8)]
    assert outs[0] == outs[1] == outs[2] and len(outs[0].splitlines()) == 4
    long = cli("generate", "--model", gru_run, "--temperature", "0", "--max-new-tokens", "60", "--prompt", "all the world " * 30)
    assert "were cut" not in long.stderr  # a GRU has no context limit: no prompt is cut


def test_eval_windows_come_from_the_default_window(cli, gru_run):
    result = json.loads(cli("eval", "--model", gru_run, "--data", TEXT, "--json").stdout)
    assert result["protocol"]["max_length"] == 64 and "no context limit" in result["protocol"]["max_length_from"]
    longer = json.loads(cli("eval", "--model", gru_run, "--data", TEXT, "--max-length", "256", "--json").stdout)
    assert longer["metrics"]["tokens_scored"] == result["metrics"]["tokens_scored"]


def test_finetune_as_lm_and_as_classifier(cli, gru_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    lm = tmp_path / "lm"
    cli("finetune", "--model", gru_run, *sets(f"data.train_file={TEXT}", "training.max_steps=3", "training.curves=false"), "-o", lm)
    assert json.loads((lm / "summary.json").read_text())["task"] == "causal-lm"
    clf = tmp_path / "clf"
    cli("finetune", "--model", gru_run, *sets(f"data.train_file={FIXTURES / 'sentiment_train.jsonl'}", "data.label_column=sentiment",
                                             "training.max_steps=6", "training.curves=false", "data.max_seq_length=32"), "-o", clf)
    summary = json.loads((clf / "summary.json").read_text())
    assert summary["task"] == "classification" and "eval_accuracy" in summary
    assert type(AutoModelForSequenceClassification.from_pretrained(clf)).__name__ == "GRUForSequenceClassification"
    labels = cli("generate", "--model", clf, "--prompt", "a wonderful film", "--prompt", "a dull film").stdout.splitlines()
    assert len(labels) == 2 and all(line.split("\t")[0] in ("negative", "positive") for line in labels)


def test_kill9_resume_reaches_the_same_step(cli, tmp_path, gru_run):
    import signal
    import subprocess
    import sys
    import time
    from hooks import CALLBACK, hook_env

    out, marker = tmp_path / "run", tmp_path / "paused"
    env = hook_env(marker, PAUSE_AT_STEP=7)
    command = [sys.executable, "-m", "llmcli", "pretrain", *sets(*TINY_GRU, "training.max_steps=10", "training.save_steps=5"), "-o", str(out)]
    proc = subprocess.Popen([*command, "--set", CALLBACK], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cli(*command[3:])  # the same command again, in this process
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 5 and summary["global_step"] == 10


def test_bad_gru_overrides_are_config_errors(cli, tmp_path):
    result = cli("pretrain", *sets(*TINY_GRU, "model.config_overrides.hidden_size=0"), "-o", tmp_path / "r", expect=2)
    assert result.stderr == "error: model.config_overrides: hidden_size must be at least 1, got 0\n"
    assert not (tmp_path / "r").exists()
