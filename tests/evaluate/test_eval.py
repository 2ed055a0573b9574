"""`llmcli eval`: perplexity against independent reference implementations (the Transformers
guide's loop; lm-eval's rolling windows, from the installed package and as a hand-written copy),
lm-eval's word and byte counts, masked-LM scoring, classifier labels, several processes, the
--json schema and the gates."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURES

TEXT = FIXTURES / "shakespeare_small.txt"
REL = 1e-5  # fp32 noise between different batchings of the same windows


def eval_json(cli, *args, expect=0):
    result = cli("eval", *args, "--json", expect=expect)
    return json.loads(result.stdout), result


def close(a, b, rel=REL):
    return abs(a - b) <= rel * abs(b)


@pytest.fixture(scope="module")
def sharp_run(gpt2_run, tmp_path_factory):
    """A random GPT-2 with large weights (initializer_range 0.5) and the tiny run's tokenizer: its
    predictions depend strongly on the context, so any misplaced window shows in the numbers
    (a briefly trained tiny model is almost a unigram model and hides it)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(gpt2_run)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=2, initializer_range=0.5,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    out = tmp_path_factory.mktemp("sharp")
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lm(sharp_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(sharp_run).eval(), AutoTokenizer.from_pretrained(sharp_run)


def reference_hf_guide(model, ids, max_length, stride):
    """The Transformers perplexity guide's loop (docs: "Perplexity of fixed-length models"),
    returning the summed NLL and the number of scored tokens."""
    import torch

    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        # the tokens the loss averages: the labels after the model's shift (the guide's own
        # `num_valid_tokens - batch_size` is one short in every window after the first, whose
        # first label is already -100)
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.item() * num_loss_tokens if num_loss_tokens else 0.0  # a 1-token text: nothing to score
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


def lm_eval_windows_copy(token_list, prefix_token, max_seq_len):
    """A hand-written copy of lm_eval.utils.get_rolling_token_windows(context_len=1) followed by
    make_disjoint_window (lm-eval 0.4), for when lm_eval is not installed."""
    windows = []
    first_seq_len = min(max_seq_len, len(token_list))
    windows.append(([prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]))
    predicted = first_seq_len
    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, max_seq_len)
        window_end = predicted + window_pred_len
        windows.append((token_list[window_end - max_seq_len - 1 : window_end - 1], token_list[window_end - window_pred_len : window_end]))
        predicted += window_pred_len
    return [(a[: len(a) - (len(b) - 1)], b) for a, b in windows]


def lm_eval_windows_package(token_list, prefix_token, max_seq_len):
    utils = pytest.importorskip("lm_eval.utils")
    return [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(token_list, prefix_token, max_seq_len, 1)]


def reference_lm_eval(model, ids, max_seq_len, make_windows):
    """lm-eval's HFLM loglikelihood_rolling: the first id is the prefix token, every later one is
    predicted once; each (context, continuation) pair is scored as HFLM._loglikelihood_tokens does,
    reading (context + continuation)[-(max_seq_len + 1):][:-1]. Returns (summed NLL, tokens, windows)."""
    import torch

    nll_sum, n, windows = 0.0, 0, make_windows(ids[1:], ids[0], max_seq_len)
    for context, continuation in windows:
        inp = (context + continuation)[-(max_seq_len + 1) :][:-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([inp])).logits[0].float(), -1)
        nll_sum -= logp[-len(continuation) :].gather(1, torch.tensor(continuation)[:, None]).double().sum().item()
        n += len(continuation)
    return nll_sum, n, len(windows)


def _write(text, name="eval.txt"):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / name
    path.write_text(text, encoding="utf-8")
    return path


SAMPLE = TEXT.read_text()[:6000]


def test_window_placement_is_the_references():
    """The windows themselves: lm-eval's (from the package, and the copy) for stride = max_length,
    the guide's loop for stride < max_length; every token after the first scored exactly once."""
    from llmcli.evaluate.perplexity import windows

    for n in [*range(1, 40), 129, 130, 257, 1000]:
        ids = list(range(10_000, 10_000 + n))
        for length in (2, 3, 7, 16, 128):
            got = [(ids[b : e - 1], ids[s:e]) for b, s, e in windows(n, length, length)]
            expected = []
            if n >= 2:
                for make in (lm_eval_windows_copy, lm_eval_windows_package):
                    expected = [((c + t)[-(length + 1) :][:-1], t) for c, t in make(ids[1:], ids[0], length)]
                    assert got == expected, (n, length)
            assert got == expected and all(len(inp) <= length for inp, _ in got)
            for stride in {1, length // 2, length - 1} - {0}:
                placed = [(b, list(range(s, e))) for b, s, e in windows(n, length, stride)]
                guide, prev_end = [], 0
                for begin in range(0, n, stride):
                    end = min(begin + length, n)
                    guide.append((begin, [t for t in range(end - (end - prev_end), end) if t > begin]))
                    prev_end = end
                    if end == n:
                        break
                if n < 2:
                    guide = []
                assert placed == guide, (n, length, stride)
                assert sorted(t for _, ts in placed for t in ts) == list(range(1, n))


@pytest.mark.parametrize("max_length, stride", [(64, 16), (64, 63), (128, 100), (64, 64), (128, 128), (16, 16)])
def test_perplexity_matches_reference(cli, sharp_run, lm, max_length, stride):
    model, tok = lm
    ids = tok(SAMPLE, add_special_tokens=False)["input_ids"]
    path = _write(SAMPLE)
    got, _ = eval_json(cli, "--model", sharp_run, "--data", path, "--max-length", max_length, "--stride", stride, "--batch-size", 3)
    m = got["metrics"]
    total = m["nll"] * m["tokens_scored"]
    if stride < max_length:
        ref_nll, ref_n = reference_hf_guide(model, ids, max_length, stride)
        assert got["protocol"]["windows"] == len(range(0, len(ids) - max_length + stride, stride))
    else:
        ref_nll, ref_n, n_windows = reference_lm_eval(model, ids, max_length, lm_eval_windows_copy)
        assert got["protocol"]["windows"] == n_windows
    assert m["tokens_scored"] == ref_n == len(ids) - 1
    assert close(total, ref_nll), (total, ref_nll)
    assert m["bytes"] == len(SAMPLE.encode()) and m["words"] == len(re.split(r"\s+", SAMPLE))
    assert got["protocol"]["max_length"] == max_length and got["protocol"]["stride"] == stride


DOCS = [" = Robert Boulter = \n", " Robert Boulter is an English film , television and theatre actor .\n" * 12,
        "All:\nSpeak, speak.", "\tROMEO:\nIs the day so young?  ", "x"]


def test_per_document_add_bos_matches_lm_eval_package(cli, sharp_run, lm, tmp_path):
    """--per-document --add-bos is lm-eval's loglikelihood_rolling with the BOS as prefix token,
    per document, and lm-eval's wikitext word and byte counts (from its own process_results)."""
    model, tok = lm
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    got, _ = eval_json(cli, "--model", sharp_run, "--data", src, "--per-document", "--add-bos", "--max-length", 16)
    ref_nll = ref_n = ref_windows = 0
    for d in DOCS:
        ids = [tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"]
        nll, n, w = reference_lm_eval(model, ids, 16, lm_eval_windows_package)
        copy = reference_lm_eval(model, ids, 16, lm_eval_windows_copy)
        assert copy == (nll, n, w)  # the hand-written copy is the package's algorithm
        ref_nll, ref_n, ref_windows = ref_nll + nll, ref_n + n, ref_windows + w
    m = got["metrics"]
    assert m["documents"] == 5 and m["tokens_scored"] == ref_n == sum(len(tok(d)["input_ids"]) for d in DOCS)
    assert got["protocol"]["windows"] == ref_windows
    assert close(m["nll"] * m["tokens_scored"], ref_nll)
    wikitext = pytest.importorskip("lm_eval.tasks.wikitext.preprocess_wikitext")
    counts = [wikitext.process_results({"page": d}, [0.0]) for d in DOCS]
    assert m["words"] == sum(c["word_perplexity"][1] for c in counts) == 6 + (1 + 12 * 12 + 1) + 3 + 8 + 1  # empty words at both ends of a doc
    assert m["bytes"] == sum(c["bits_per_byte"][1] for c in counts)
    assert close(m["word_perplexity"], math.exp(ref_nll / m["words"]))


def test_per_document_sliding_matches_the_guide(cli, sharp_run, lm, tmp_path):
    model, tok = lm
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    got, _ = eval_json(cli, "--model", sharp_run, "--data", src, "--per-document", "--max-length", 16, "--stride", 5)
    ref_nll = ref_n = 0
    for d in DOCS:
        nll, n = reference_hf_guide(model, tok(d, add_special_tokens=False)["input_ids"], 16, 5)
        ref_nll, ref_n = ref_nll + nll, ref_n + n
    assert got["metrics"]["tokens_scored"] == ref_n == sum(len(tok(d)["input_ids"]) - 1 for d in DOCS)
    assert close(got["metrics"]["nll"] * ref_n, ref_nll)
    # joined mode: one text, documents separated by a blank line
    joined, _ = eval_json(cli, "--model", sharp_run, "--data", src)
    text = "\n\n".join(DOCS)
    assert joined["metrics"]["bytes"] == len(text.encode()) and joined["metrics"]["documents"] == 1
    assert joined["metrics"]["words"] == len(re.split(r"\s+", text))


def test_bits_per_byte_and_word_perplexity_arithmetic(cli, gpt2_run, tmp_path):
    text = "héllo wörld, to be\nor not — to be.\n"
    src = tmp_path / "t.txt"
    src.write_text(text, encoding="utf-8")
    m, _ = eval_json(cli, "--model", gpt2_run, "--data", src)
    m = m["metrics"]
    # lm-eval's count: 9 words, and the trailing newline adds an empty one
    assert m["bytes"] == len(text.encode("utf-8")) == 39 and m["words"] == 10
    total = m["nll"] * m["tokens_scored"]
    assert math.isclose(m["bits_per_byte"], total / (39 * math.log(2)), rel_tol=1e-9)
    assert math.isclose(m["byte_perplexity"], 2 ** m["bits_per_byte"], rel_tol=1e-9)
    assert math.isclose(m["word_perplexity"], math.exp(total / 10), rel_tol=1e-9)
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
    assert (got["protocol"]["device"], got["protocol"]["dtype"], got["protocol"]["processes"]) == ("cpu", "float32", 1)
    half, _ = eval_json(cli, "--model", gpt2_run, "--data", _write(SAMPLE[:1000]), "--max-length", 64, "--dtype", "bfloat16")
    assert half["protocol"]["dtype"] == "bfloat16"
    assert json.loads(out.read_text())["metrics"] == got["metrics"]


def test_gates(cli, gpt2_run):
    result = cli("eval", "--model", gpt2_run, "--data", TEXT, "--max-length", 64, "--fail-over", "perplexity=1.5", expect=3)
    assert "perplexity:" in result.stdout  # results printed before the gate fails
    assert "evaluation gate failed: perplexity=" in result.stderr and "> 1.5" in result.stderr
    cli("eval", "--model", gpt2_run, "--data", TEXT, "--max-length", 64, "--fail-over", "perplexity=1e9", "--fail-under", "bits_per_byte=0.01")
    result = cli("eval", "--model", gpt2_run, "--data", TEXT, "--fail-under", "acuracy=0.9", expect=2)
    assert "unknown metric 'acuracy'" in result.stderr


def test_classification_report_known_confusion_matrix():
    from llmcli.evaluate.metrics import classification_report

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


def reference_masked_lm(model, tok, text, max_length, probability):
    """The documented masked-LM protocol, written out: [CLS] + max_length-2 tokens + [SEP] blocks;
    in block i (generator seeded i): rand < p picks non-special tokens, a second rand picks
    [MASK] (< 0.8) / random (< 0.9) / kept, then randint gives the random ids. Loss from the
    model's own `labels` path, one block at a time."""
    import torch

    ids = tok(text, add_special_tokens=False)["input_ids"]
    body = max_length - 2
    total, correct, count = 0.0, 0, 0
    for i, start in enumerate(range(0, len(ids), body)):
        block = torch.tensor([[tok.cls_token_id] + ids[start : start + body] + [tok.sep_token_id]])
        g = torch.Generator().manual_seed(i)
        pick = torch.rand(block.shape[1], generator=g)[None] < probability
        pick[0, 0] = pick[0, -1] = False
        action = torch.rand(block.shape[1], generator=g)[None]
        random_ids = torch.randint(len(tok), (block.shape[1],), generator=g)[None]
        inp = torch.where(pick & (action < 0.8), tok.mask_token_id, block)
        inp = torch.where(pick & (action >= 0.8) & (action < 0.9), random_ids, inp)
        labels = torch.where(pick, block, -100)
        with torch.no_grad():
            out = model(input_ids=inp, labels=labels)
        n = int(pick.sum())
        total += out.loss.item() * n if n else 0.0
        correct += int((out.logits[pick].argmax(-1) == block[pick]).sum())
        count += n
    return total, correct, count


def test_masked_lm_eval_matches_reference(cli, bert_run):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model, tok = AutoModelForMaskedLM.from_pretrained(bert_run).eval(), AutoTokenizer.from_pretrained(bert_run)
    text = TEXT.read_text()[:4000]
    path = _write(text)
    a, _ = eval_json(cli, "--model", bert_run, "--data", path, "--max-length", 64, "--batch-size", 3)
    b, _ = eval_json(cli, "--model", bert_run, "--data", path, "--max-length", 64, "--batch-size", 1)
    assert a["task"] == "masked-lm"
    # the masks do not depend on the batching: the same tokens are masked, the same loss
    assert a["metrics"]["masked_tokens"] == b["metrics"]["masked_tokens"] and close(a["metrics"]["mlm_loss"], b["metrics"]["mlm_loss"])
    total, correct, count = reference_masked_lm(model, tok, text, 64, 0.15)
    m = b["metrics"]  # batch 1: the reference's shapes, so the argmax is computed on the same numbers
    assert m["masked_tokens"] == count and a["protocol"]["blocks"] == math.ceil(len(tok(text, add_special_tokens=False)["input_ids"]) / 62)
    assert close(m["mlm_loss"] * count, total) and close(a["metrics"]["mlm_loss"] * count, total)
    assert m["mlm_accuracy"] == correct / count


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
    # a flag's value is taken as typed, never as YAML: the column "true" is not the boolean true
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps({"true": t}) + "\n" for t in docs["test"]))
    named_true, _ = eval_json(cli, "--model", gpt2_run, "--data", renamed, "--text-column", "true")
    assert named_true["metrics"] == got["metrics"]
    result = cli("eval", "--model", gpt2_run, "--dataset", folder, "--split", "validation", expect=4)
    assert "'validation' not in" in result.stderr and "test" in result.stderr


def test_classifier_eval_with_labels_the_model_lacks(cli, classifier_run):
    """The classifier knows negative/positive; the file's 0/1 labels are mapped by class index, never
    silently: the mapping is on stderr (test_integer_labels_against_a_classifier_with_named_labels
    checks the numbers and that other integers still fail)."""
    result = cli("eval", "--model", classifier_run, "--data", FIXTURES / "sentiment_dev.tsv")
    assert "the data's labels are integers, the model's are named: integer labels by class index: 0=negative, 1=positive" in result.stderr


# --------------------------------------------------------------------------------------------
# Classifier labels: unlabelled hub splits, placeholder label names


@pytest.fixture(scope="module")
def classlabel_folder(tmp_path_factory):
    """A local stand-in for a GLUE-style hub dataset: ClassLabel labels, a labelled validation
    split and a test split whose labels are all -1 (parquet keeps the ClassLabel feature)."""
    import datasets

    rows = [json.loads(line) for line in (FIXTURES / "sentiment_dev.jsonl").read_text().splitlines()]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])})
    folder = tmp_path_factory.mktemp("glue_like")
    texts = [r["text"] for r in rows]
    datasets.Dataset.from_dict({"text": texts, "label": [["negative", "positive"].index(r["sentiment"]) for r in rows]},
                               features=features).to_parquet(str(folder / "validation.parquet"))
    datasets.Dataset.from_dict({"text": texts, "label": [-1] * len(rows)}, features=features).to_parquet(str(folder / "test.parquet"))
    return folder


def test_unlabelled_split_is_a_data_error(cli, classifier_run, classlabel_folder):
    result = cli("eval", "--model", classifier_run, "--dataset", classlabel_folder, expect=4)  # default split: test
    assert f"'test' split of {classlabel_folder}" in result.stderr and "40 of 40 rows have label -1" in result.stderr
    assert "--split validation" in result.stderr and "Traceback" not in result.stderr
    # the labelled split gives the same numbers as the same rows with string labels
    got, _ = eval_json(cli, "--model", classifier_run, "--dataset", classlabel_folder, "--split", "validation")
    same, _ = eval_json(cli, "--model", classifier_run, "--data", FIXTURES / "sentiment_dev.jsonl", "--label-column", "sentiment")
    assert got["metrics"]["confusion_matrix"] == same["metrics"]["confusion_matrix"] and got["metrics"]["examples"] == 40


@pytest.fixture(scope="module")
def placeholder_classifier(bert_run, tmp_path_factory):
    """A classifier saved with the library's default labels (LABEL_0, LABEL_1), as many hub models are."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(bert_run, num_labels=2)
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    out = tmp_path_factory.mktemp("placeholder")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(bert_run).save_pretrained(out)
    return out


def _predict(model_dir, texts):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tok = AutoModelForSequenceClassification.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return [int(model(**tok(t, truncation=True, max_length=128, return_tensors="pt")).logits.argmax(-1)) for t in texts]


def test_placeholder_labels_map_by_index(cli, placeholder_classifier, classlabel_folder):
    rows = [line.split("\t") for line in (FIXTURES / "sentiment_dev.tsv").read_text().splitlines()[1:]]
    texts, labels = [r[0] for r in rows], [int(r[1]) for r in rows]
    preds = _predict(placeholder_classifier, texts)
    got, _ = eval_json(cli, "--model", placeholder_classifier, "--data", FIXTURES / "sentiment_dev.tsv")
    m = got["metrics"]
    assert m["examples"] == len(rows) and m["confusion_matrix"]["labels"] == ["0", "1"]
    assert m["confusion_matrix"]["matrix"] == [[sum(1 for y, p in zip(labels, preds) if (y, p) == (t, q)) for q in (0, 1)] for t in (0, 1)]
    assert m["accuracy"] == sum(y == p for y, p in zip(labels, preds)) / len(rows)
    # ClassLabel data: mapped by id, reported under the dataset's names
    got, _ = eval_json(cli, "--model", placeholder_classifier, "--dataset", classlabel_folder, "--split", "validation")
    assert got["metrics"]["confusion_matrix"]["labels"] == ["negative", "positive"] and got["metrics"]["examples"] == 40
    # labels beyond the model's classes still fail, naming the label
    bad = _write("sentence\tlabel\nfine\t2\n", "bad.tsv")
    assert "label 2 (row 1" in cli("eval", "--model", placeholder_classifier, "--data", bad, expect=4).stderr


# --------------------------------------------------------------------------------------------
# Context length, several processes


def test_context_length_subtracts_the_position_offset():
    from transformers import BertConfig, GPT2Config, RobertaConfig, XLMRobertaConfig

    from llmcli.models.load import context_length

    assert context_length(RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512  # roberta-base: positions start at 2
    assert context_length(RobertaConfig(max_position_embeddings=130, pad_token_id=0)) == 129
    assert context_length(XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1)) == 512
    assert context_length(BertConfig()) == 512 and context_length(GPT2Config(n_positions=256)) == 256


def test_roberta_causal_lm_default_window_fits(cli, gpt2_run, tmp_path):
    """The default window is the model's usable context: RoBERTa's last position row is never indexed past."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForCausalLM

    tok = AutoTokenizer.from_pretrained(gpt2_run)
    config = RobertaConfig(vocab_size=len(tok) + 64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=42, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, is_decoder=True)
    RobertaForCausalLM(config).save_pretrained(tmp_path / "roberta")
    tok.save_pretrained(tmp_path / "roberta")
    got, _ = eval_json(cli, "--model", tmp_path / "roberta", "--data", _write(SAMPLE[:3000]))
    assert got["protocol"]["max_length"] == 42 - (tok.pad_token_id + 1)
    assert got["metrics"]["tokens_scored"] == len(tok(SAMPLE[:3000])["input_ids"]) - 1


def test_two_processes_match_one(cli, sharp_run, tmp_path):
    """--num-processes 2 (gloo ranks on CPU): the windows are split across the ranks and the sums
    reduced, so the numbers are the single process's; the main process alone reports them."""
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS + [SAMPLE[:2500]]))
    args = ["eval", "--model", str(sharp_run), "--data", str(src), "--per-document", "--max-length", "16", "--stride", "12", "--batch-size", "2", "--json"]
    one, _ = eval_json(cli, *args[1:-1])
    proc = subprocess.run([sys.executable, "-m", "llmcli", *args, "--num-processes", "2"], capture_output=True, text=True, check=False, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    two = json.loads(lines[0])
    assert two["protocol"]["processes"] == 2 and one["protocol"]["processes"] == 1
    for key in ("tokens_scored", "bytes", "words", "documents"):
        assert two["metrics"][key] == one["metrics"][key]
    assert close(two["metrics"]["nll"], one["metrics"]["nll"]) and two["protocol"]["windows"] == one["protocol"]["windows"]


def test_integer_labels_against_a_classifier_with_named_labels(cli, classifier_run, tmp_path):
    """SST-2's 0/1 labels with a negative/positive classifier: label i is the model's class i, the
    output says so, and the numbers are those of the same rows with named labels."""
    rows = [json.loads(line) for line in (FIXTURES / "sentiment_dev.jsonl").read_text().splitlines()]
    named, numbered = tmp_path / "named.tsv", tmp_path / "numbered.tsv"
    named.write_text("sentence\tlabel\n" + "".join(f"{r['text']}\t{r['sentiment']}\n" for r in rows))
    numbered.write_text("sentence\tlabel\n" + "".join(f"{r['text']}\t{int(r['sentiment'] == 'positive')}\n" for r in rows))
    by_name = json.loads(cli("eval", "--model", classifier_run, "--data", named, "--json").stdout)
    result = cli("eval", "--model", classifier_run, "--data", numbered, "--json")
    by_index = json.loads(result.stdout)
    assert by_index["protocol"]["label_mapping"] == "integer labels by class index: 0=negative, 1=positive"
    assert "label_mapping" not in by_name["protocol"]
    assert "0=negative, 1=positive" in cli("eval", "--model", classifier_run, "--data", numbered).stderr  # said without --json too
    assert by_index["metrics"] == by_name["metrics"]
    (tmp_path / "three.tsv").write_text("sentence\tlabel\na\t0\nb\t2\n")  # 2 is no class of a 2-class model
    assert "is not one of the model's labels" in cli("eval", "--model", classifier_run, "--data", tmp_path / "three.tsv", expect=4).stderr
