"""`llmcli export`: a classifier's model.onnx, checked against the model before it is written, which `generate`,
`eval` and `serve` then label with; a mismatch writes nothing; a LoRA run merged into a full model dir."""

import json
import shutil

import pytest

from conftest import CLASSIFIER, FIXTURES, read_jsonl, sets

pytest.importorskip("onnxruntime")

DEV = FIXTURES / "sentiment_dev.jsonl"


@pytest.fixture
def run(classifier_run, tmp_path):
    """A copy of the session's classifier run (export writes into the run dir)."""
    return shutil.copytree(classifier_run, tmp_path / "clf")


def test_export_then_generate_eval_use_onnx_with_the_same_labels(cli, run, tmp_path):
    result = cli("export", "--model", run)
    assert (run / "model.onnx").exists() and not list(run.glob(".*.tmp"))
    record = json.loads((run / "model.onnx.json").read_text())
    assert record["check"]["rows"] == 40 and record["check"]["labels_differ"] == 0 and record["check"]["max_prob_diff"] <= 1e-4
    assert "40 rows" in result.stderr and "[torch.onnx]" not in result.stdout + result.stderr  # the exporter's chatter only with --debug

    texts = _dev_texts(tmp_path)
    torch_out = cli("generate", "--model", run, "--input", texts, "--format", "jsonl", "--runtime", "torch")
    onnx_out = cli("generate", "--model", run, "--input", texts, "--format", "jsonl")  # auto: model.onnx is there and current
    assert "ONNX Runtime" in onnx_out.stderr and "ONNX Runtime" not in torch_out.stderr
    a, b = read_jsonl_text(torch_out.stdout), read_jsonl_text(onnx_out.stdout)
    assert [x["label"] for x in a] == [x["label"] for x in b] and len(a) == 40
    for x, y in zip(a, b):
        assert y["scores"] == pytest.approx(x["scores"], abs=1e-5)

    evals = [json.loads(cli("eval", "--model", run, "--data", DEV, "--label-column", "sentiment", "--json", "--runtime", rt).stdout)
             for rt in ("torch", "onnx")]
    assert [e["protocol"]["runtime"] for e in evals] == ["torch", "onnx"]
    m = [e["metrics"] for e in evals]
    assert m[0]["confusion_matrix"] == m[1]["confusion_matrix"] and m[0]["accuracy"] == m[1]["accuracy"] and m[0]["examples"] == 40

    # new weights after the export: auto goes back to torch (and says why); --runtime onnx still uses the file
    from safetensors.torch import load_file, save_file

    weights = load_file(run / "model.safetensors")
    name = next(k for k in weights if k.endswith("classifier.bias"))
    weights[name] = weights[name] + 1.0
    save_file(weights, run / "model.safetensors", metadata={"format": "pt"})
    stale = cli("generate", "--model", run, "--input", texts, "--format", "jsonl")
    assert "weights changed since it was exported" in stale.stderr and "labelling with ONNX Runtime" not in stale.stderr


def _shift_onnx_logits(patch) -> None:
    """An exporter bug, as the check would see it: ONNX Runtime's first logit moves by 0.01 (with `patch`, a
    MonkeyPatch or one of its contexts)."""
    from llmcli.models import onnx

    call = onnx.OnnxClassifier.__call__

    def off(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        out.logits[:, 0] += 0.01
        return out

    patch.setattr(onnx.OnnxClassifier, "__call__", off)


def _dev_texts(tmp_path):
    """The dev sentences as a text file, one prompt a line."""
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(r["text"] + "\n" for r in read_jsonl(DEV)))
    return texts


def test_a_mismatched_export_writes_nothing(cli, run, monkeypatch):
    _shift_onnx_logits(monkeypatch)
    result = cli("export", "--model", run, expect=1)
    assert "disagrees with the model" in result.stderr and "nothing written" in result.stderr and "Traceback" not in result.stderr
    assert not (run / "model.onnx").exists() and not (run / "model.onnx.json").exists() and not list(run.glob(".*.tmp"))


def test_a_gpt2_reward_model_exports_with_its_scores(cli, reward_run, tmp_path, monkeypatch):
    """A reward model's export is checked on its scores (a softmax over its one output is always 1, so a label check
    passes anything), and a GPT-2 one scores as the model does: GPT-2 takes token_type_ids but adds their embedding
    when given, so only the tokenizer's inputs are traced. An export from before that is not used."""
    from llmcli.models import onnx

    run = shutil.copytree(reward_run, tmp_path / "reward")
    texts = _dev_texts(tmp_path)
    with monkeypatch.context() as patched:
        _shift_onnx_logits(patched)  # the scores move by 0.01: well past the check's 1e-4
        refused = cli("export", "--model", run, "--data", DEV, "--set", "data.label_column=sentiment", expect=1)
    assert "disagrees with the model on" in refused.stderr and "largest score difference" in refused.stderr
    assert "labels differ" not in refused.stderr and not (run / "model.onnx").exists()

    cli("export", "--model", run, "--data", DEV, "--set", "data.label_column=sentiment")
    record = json.loads((run / "model.onnx.json").read_text())
    assert record["format"] == onnx.RECORD_FORMAT and record["check"]["rows"] == 40 and record["check"]["max_score_diff"] <= 1e-4
    torch_out = read_jsonl_text(cli("generate", "--model", run, "--input", texts, "--format", "jsonl", "--runtime", "torch").stdout)
    onnx_run = cli("generate", "--model", run, "--input", texts, "--format", "jsonl")
    assert "labelling with ONNX Runtime" in onnx_run.stderr and len(torch_out) == 40
    assert [o["score"] for o in read_jsonl_text(onnx_run.stdout)] == pytest.approx([o["score"] for o in torch_out], rel=1e-5, abs=1e-6)

    del record["format"]  # as an older llmcli wrote it
    (run / "model.onnx.json").write_text(json.dumps(record))
    old = cli("generate", "--model", run, "--input", texts, "--format", "jsonl")
    assert "an older `llmcli export` wrote it" in old.stderr and "labelling with ONNX Runtime" not in old.stderr
    assert read_jsonl_text(old.stdout) == torch_out


def test_export_bad_input_is_exit_2(cli, gpt2_run, classifier_run, tmp_path):
    assert "exports sequence classifiers" in cli("export", "--model", gpt2_run, "--data", DEV, expect=2).stderr
    assert "--format" in cli("export", "--model", classifier_run, "--format", "tflite", expect=2).stderr
    bare = shutil.copytree(classifier_run, tmp_path / "bare", ignore=shutil.ignore_patterns("config.yaml"))
    assert "pass --data FILE" in cli("export", "--model", bare, expect=2).stderr
    assert "no " in cli("generate", "--model", bare, "-p", "fine", "--runtime", "onnx", expect=2).stderr
    assert not (bare / "model.onnx").exists()


def test_export_hf_merges_a_lora_classifier(cli, bert_run, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmcli.config import ModelSection
    from llmcli.models import load

    lora = tmp_path / "lora"
    cli("finetune", "--model", bert_run, *sets(*CLASSIFIER, f"data.train_file={FIXTURES / 'sentiment_train.jsonl'}",
        f"data.validation_file={DEV}", "data.label_column=sentiment", "peft.r=4", "peft.merge=false", "training.max_steps=10"), "-o", lora)
    assert not (lora / "merged").exists()
    cli("export", "--model", lora, "--format", "hf", "-o", tmp_path / "full")
    full = AutoModelForSequenceClassification.from_pretrained(tmp_path / "full").eval()
    adapter, tok, _ = load.load_for_inference(str(lora), ModelSection(), "cpu", None)
    assert full.config.id2label == adapter.config.id2label == {0: "negative", 1: "positive"}
    enc = AutoTokenizer.from_pretrained(tmp_path / "full")([r["text"] for r in read_jsonl(DEV)], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(full(**enc).logits, adapter(**enc).logits, rtol=1e-5, atol=1e-5)
    assert "merges LoRA run dirs" in cli("export", "--model", tmp_path / "full", "--format", "hf", expect=2).stderr


def read_jsonl_text(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]
