"""`llmcli eval`: perplexity against independent reference implementations, bits per byte and
word perplexity arithmetic, classifier metrics, the --json schema and the gates."""

import json
import math

import numpy as np
import pytest

from conftest import FIXTURES

TEXT = FIXTURES / "shakespeare_small.txt"


def eval_json(cli, *args, expect=0):
    result = cli("eval", *args, "--json", expect=expect)
    return json.loads(result.stdout), result


@pytest.fixture(scope="module")
def lm(gpt2_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(gpt2_run).eval(), AutoTokenizer.from_pretrained(gpt2_run)


def reference_hf_guide(model, ids, max_length, stride):
    """The Transformers perplexity guide's loop, verbatim in spirit (stride < max_length)."""
    import torch

    ids = torch.tensor([ids])
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * valid
        n_tokens += valid
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


def reference_lm_eval_rolling(model, ids, max_seq_len):
    """lm-evaluation-harness get_rolling_token_windows (context_len=1), with the first token as
    the prefix token: every later token is predicted exactly once."""
    import torch

    prefix, tokens = ids[0], ids[1:]
    windows = []
    first = min(max_seq_len, len(tokens))
    windows.append(([prefix] + tokens[: first - 1], tokens[:first]))
    predicted = first
    while predicted < len(tokens):
        pred_len = min(len(tokens) - predicted, max_seq_len)
        end = predicted + pred_len
        windows.append((tokens[end - max_seq_len - 1 : end - 1], tokens[end - pred_len : end]))
        predicted += pred_len
    nll_sum, n = 0.0, 0
    for inp, targets in windows:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), -1)
        scored = logp[-len(targets):].gather(1, torch.tensor(targets)[:, None])
        nll_sum -= scored.sum().item()
        n += len(targets)
    return nll_sum, n


@pytest.mark.parametrize("max_length, stride", [(64, 16), (64, 32), (128, 100), (64, 64), (128, 128)])
def test_perplexity_matches_reference(cli, gpt2_run, lm, max_length, stride):
    model, tok = lm
    text = TEXT.read_text()[:6000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if stride < max_length:
        ref_nll, ref_n = reference_hf_guide(model, ids, max_length, stride)
    else:
        ref_nll, ref_n = reference_lm_eval_rolling(model, ids, max_length - 1)
    path = _write(text)
    got, _ = eval_json(cli, "--model", gpt2_run, "--data", path, "--max-length", max_length, "--stride", stride, "--batch-size", 3)
    assert got["metrics"]["tokens_scored"] == ref_n == len(ids) - 1
    ref_ppl = math.exp(ref_nll / ref_n)
    assert abs(got["metrics"]["perplexity"] - ref_ppl) / ref_ppl < 1e-3
    assert got["protocol"]["max_length"] == max_length and got["protocol"]["stride"] == stride


def _write(text, name="eval.txt"):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / name
    path.write_text(text, encoding="utf-8")
    return path


def test_per_document_scores_each_document(cli, gpt2_run, lm, tmp_path):
    model, tok = lm
    docs = ["First Citizen:\nBefore we proceed any further, hear me speak.", "All:\nSpeak, speak.", "ROMEO:\nIs the day so young?"]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    got, _ = eval_json(cli, "--model", gpt2_run, "--data", src, "--per-document", "--max-length", 16, "--stride", 8)
    ref_nll = ref_n = 0
    for d in docs:
        nll, n = reference_hf_guide(model, tok(d, add_special_tokens=False)["input_ids"], 16, 8)
        ref_nll, ref_n = ref_nll + nll, ref_n + n
    assert got["metrics"]["documents"] == 3 and got["metrics"]["tokens_scored"] == ref_n
    assert abs(got["metrics"]["nll"] - ref_nll / ref_n) < 1e-4
    # joined mode: one text, documents separated by a blank line
    joined, _ = eval_json(cli, "--model", gpt2_run, "--data", src)
    assert joined["metrics"]["bytes"] == len("\n\n".join(docs).encode()) and joined["metrics"]["documents"] == 1


def test_bits_per_byte_and_word_perplexity_arithmetic(cli, gpt2_run, tmp_path):
    text = "héllo wörld, to be\nor not — to be.\n"
    src = tmp_path / "t.txt"
    src.write_text(text, encoding="utf-8")
    m, _ = eval_json(cli, "--model", gpt2_run, "--data", src)
    m = m["metrics"]
    assert m["bytes"] == len(text.encode("utf-8")) == 39 and m["words"] == 9
    total = m["nll"] * m["tokens_scored"]
    assert math.isclose(m["bits_per_byte"], total / (39 * math.log(2)), rel_tol=1e-9)
    assert math.isclose(m["byte_perplexity"], 2 ** m["bits_per_byte"], rel_tol=1e-9)
    assert math.isclose(m["word_perplexity"], math.exp(total / 9), rel_tol=1e-9)
    assert math.isclose(m["perplexity"], math.exp(m["nll"]), rel_tol=1e-12)


def test_add_bos_scores_every_token(cli, gpt2_run, tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("To be, or not to be: that is the question.")
    plain, _ = eval_json(cli, "--model", gpt2_run, "--data", src)
    bos, _ = eval_json(cli, "--model", gpt2_run, "--data", src, "--add-bos")
    assert bos["metrics"]["tokens_scored"] == plain["metrics"]["tokens_scored"] + 1 and bos["protocol"]["add_bos"] is True


def test_json_schema_and_output_file(cli, gpt2_run, tmp_path):
    out = tmp_path / "r.json"
    got, result = eval_json(cli, "--model", gpt2_run, "--data", TEXT, "--output", out, "--max-length", 64)
    assert set(got) == {"model", "task", "data", "protocol", "metrics", "runtime_s"}
    assert got["task"] == "causal-lm" and result.stdout.count("\n") == 1
    assert json.loads(out.read_text())["metrics"] == got["metrics"]


def test_gates(cli, gpt2_run):
    result = cli("eval", "--model", gpt2_run, "--data", TEXT, "--max-length", 64, "--fail-over", "perplexity=1.5", expect=3)
    assert "perplexity:" in result.stdout  # results printed before the gate fails
    assert "evaluation gate failed: perplexity=" in result.stderr and "> 1.5" in result.stderr
    cli("eval", "--model", gpt2_run, "--data", TEXT, "--max-length", 64, "--fail-over", "perplexity=1e9", "--fail-under", "bits_per_byte=0.01")
    result = cli("eval", "--model", gpt2_run, "--data", TEXT, "--fail-under", "acuracy=0.9", expect=2)
    assert "unknown metric 'acuracy'" in result.stderr


def test_classification_report_known_confusion_matrix():
    from llmcli.metrics import classification_report

    y_true = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    y_pred = [0, 0, 1, 2, 1, 1, 0, 2, 2, 2]
    r = classification_report(y_true, y_pred, ["a", "b", "c"])
    assert r["confusion_matrix"]["matrix"] == [[2, 1, 1], [1, 2, 0], [0, 0, 3]]
    assert r["accuracy"] == 0.7
    p = [2 / 3, 2 / 3, 3 / 4]
    rc = [2 / 4, 2 / 3, 1.0]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, rc)]
    assert np.allclose([r["per_class"][k]["precision"] for k in "abc"], p)
    assert np.allclose([r["per_class"][k]["recall"] for k in "abc"], rc)
    assert math.isclose(r["f1"], sum(f1) / 3) and math.isclose(r["precision"], sum(p) / 3)
    assert [r["per_class"][k]["support"] for k in "abc"] == [4, 3, 3]


def test_classifier_eval_and_errors_file(cli, classifier_run, tmp_path):
    errors = tmp_path / "wrong.jsonl"
    got, _ = eval_json(cli, "--model", classifier_run, "--data", FIXTURES / "sentiment_dev.jsonl", "--label-column", "sentiment",
                       "--errors", errors)
    m = got["metrics"]
    assert got["task"] == "classification" and m["examples"] == 40
    cm = np.array(m["confusion_matrix"]["matrix"])
    assert m["confusion_matrix"]["labels"] == ["negative", "positive"] and cm.sum() == 40
    assert math.isclose(m["accuracy"], np.trace(cm) / 40)
    wrong = [json.loads(x) for x in errors.read_text().splitlines()]
    assert len(wrong) == 40 - np.trace(cm)
    assert all(w["label"] != w["predicted"] and "text" in w for w in wrong)
    # the same numbers as finetune's own final evaluation
    summary = json.loads((classifier_run / "summary.json").read_text())
    assert math.isclose(summary["eval_accuracy"], m["accuracy"])


def test_masked_lm_eval_is_deterministic(cli, bert_run):
    a, _ = eval_json(cli, "--model", bert_run, "--data", TEXT)
    b, _ = eval_json(cli, "--model", bert_run, "--data", TEXT)
    assert a["task"] == "masked-lm" and a["metrics"] == b["metrics"]
    assert 0 <= a["metrics"]["mlm_accuracy"] <= 1 and a["metrics"]["masked_tokens"] > 100


def test_dataset_split_path(cli, gpt2_run, tmp_path):
    """--dataset/--split goes through `datasets.load_dataset` as a hub id would; a local folder stands in for the Hub."""
    folder = tmp_path / "tiny_wiki"
    folder.mkdir()
    docs = {"train": ["unused"], "test": [" = Title = \n", "", "ROMEO: is the day so young?\n", "JULIET: ay.\n"]}
    for split, rows in docs.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    got, _ = eval_json(cli, "--model", gpt2_run, "--dataset", folder, "--split", "test")
    assert got["metrics"]["bytes"] == len("\n\n".join(docs["test"]).encode()) and got["data"].endswith(":test")
    per_doc, _ = eval_json(cli, "--model", gpt2_run, "--dataset", folder, "--split", "test", "--per-document")
    assert per_doc["metrics"]["documents"] == 3  # the empty row is not a document
    result = cli("eval", "--model", gpt2_run, "--dataset", folder, "--split", "validation", expect=4)
    assert "'validation' not in" in result.stderr and "test" in result.stderr


def test_classifier_eval_with_labels_the_model_lacks(cli, classifier_run):
    """The classifier knows negative/positive; integer labels in the file are not mapped silently."""
    result = cli("eval", "--model", classifier_run, "--data", FIXTURES / "sentiment_dev.tsv", expect=4)
    assert "is not one of the model's labels (negative, positive)" in result.stderr
