"""`llmcli finetune`: classifiers (BERT and GPT-2, int and string labels, TSV and JSONL), causal-LM
and prompt/completion fine-tuning, LoRA, and bad label columns."""

import json

import pytest

from conftest import CLASSIFIER, FIXTURES, read_jsonl, sets

TSV_TRAIN, TSV_DEV = FIXTURES / "sentiment_train.tsv", FIXTURES / "sentiment_dev.tsv"


def test_bert_classifier_with_string_labels(classifier_run):
    from transformers import AutoModelForSequenceClassification

    summary = json.loads((classifier_run / "summary.json").read_text())
    assert summary["task"] == "classification"
    assert summary["eval_accuracy"] >= 0.8, summary
    # every metric recomputed by scikit-learn from the saved model's own predictions on the dev file
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    dev = read_jsonl(FIXTURES / "sentiment_dev.jsonl")
    truth = [["negative", "positive"].index(r["sentiment"]) for r in dev]
    preds = _predict(classifier_run, [r["text"] for r in dev])
    p, r, f, _ = precision_recall_fscore_support(truth, preds, average="macro", zero_division=0)
    assert summary["eval_accuracy"] == accuracy_score(truth, preds)
    assert [summary["eval_precision"], summary["eval_recall"], summary["eval_f1"]] == pytest.approx([p, r, f], rel=1e-9)
    assert set(summary["eval_per_class"]) == {"negative", "positive"}
    assert json.loads((classifier_run / "confusion_matrix.json").read_text())["matrix"] == confusion_matrix(truth, preds).tolist()
    assert sum(c["support"] for c in summary["eval_per_class"].values()) == 40
    cm = json.loads((classifier_run / "confusion_matrix.json").read_text())
    assert cm["labels"] == ["negative", "positive"] and sum(map(sum, cm["matrix"])) == 40
    # accuracy in the summary is the confusion matrix's diagonal share
    assert abs(summary["eval_accuracy"] - (cm["matrix"][0][0] + cm["matrix"][1][1]) / 40) < 1e-9
    model = AutoModelForSequenceClassification.from_pretrained(classifier_run)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    events = read_jsonl(classifier_run / "metrics.jsonl")
    assert [e["step"] for e in events if "eval_accuracy" in e][:2] == [30, 60]


def test_gpt2_classifier_with_int_labels_from_tsv(cli, gpt2_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "gpt2-clf"
    cli("finetune", "--model", gpt2_run, *sets(*CLASSIFIER, f"data.train_file={TSV_TRAIN}", f"data.validation_file={TSV_DEV}"), "-o", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classification" and summary["global_step"] == 60
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.pad_token_id is not None and model.config.id2label == {0: "0", 1: "1"}
    # the reported accuracy is the saved model's, recomputed here one sentence at a time (no padding at all)
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    rows = [line.rsplit("\t", 1) for line in TSV_DEV.read_text().splitlines()[1:]]
    with torch.inference_mode():
        correct = sum(int(model(**tok(text, return_tensors="pt", truncation=True, max_length=32)).logits.argmax(-1)) == int(label)
                      for text, label in rows)
    assert len(rows) == 40 and summary["eval_accuracy"] == correct / 40


def test_early_stopping_and_best_model(cli, bert_run, tmp_path):
    out = tmp_path / "es"
    cli("finetune", "--model", bert_run, *sets(*CLASSIFIER, f"data.train_file={TSV_TRAIN}", f"data.validation_file={TSV_DEV}",
        "training.max_steps=200", "training.eval_steps=10", "training.save_steps=10", "training.load_best_model_at_end=true",
        "training.metric_for_best_model=accuracy", "training.early_stopping_patience=2", "training.early_stopping_threshold=0.5"), "-o", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 30  # an improvement of 0.5 accuracy never comes: stop after 2 more evaluations
    evals = {e["step"]: e["eval_accuracy"] for e in read_jsonl(out / "metrics.jsonl") if "eval_accuracy" in e}
    best_step = max(sorted(evals), key=lambda s: evals[s])  # the first step with the best accuracy
    assert summary["best_model_checkpoint"] == str(out / f"checkpoint-{best_step}")
    assert (out / f"checkpoint-{best_step}" / "model.safetensors").exists()
    assert summary["eval_accuracy"] == evals[best_step]  # the best model was reloaded at the end


def test_unseen_validation_label_is_a_data_error(cli, bert_run, tmp_path):
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"text": "fine", "sentiment": "neutral"}) + "\n")
    result = cli("finetune", "--model", bert_run, *sets(*CLASSIFIER, f"data.train_file={FIXTURES / 'sentiment_train.jsonl'}",
                 f"data.validation_file={dev}", "data.label_column=sentiment"), "-o", tmp_path / "x", expect=4)
    assert "'neutral'" in result.stderr and "never occurs in training" in result.stderr


def test_missing_label_column_lists_columns(cli, bert_run, tmp_path):
    result = cli("finetune", "--model", bert_run, *sets(*CLASSIFIER, f"data.train_file={TSV_TRAIN}", "data.label_column=stars"),
                 "-o", tmp_path / "x", expect=4)
    assert "column 'stars' not found" in result.stderr and "sentence, label" in result.stderr


def test_causal_lm_finetune_from_run_dir(cli, gpt2_run, tmp_path):
    out = tmp_path / "more"
    text = tmp_path / "more.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 60)
    cli("finetune", "--model", gpt2_run, *sets(f"data.train_file={text}", "data.block_size=32", "training.max_steps=15",
        "training.learning_rate=3e-3", "training.logging_steps=5"), "-o", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "causal-lm"
    losses = [e["loss"] for e in read_jsonl(out / "metrics.jsonl") if "loss" in e]
    assert losses[-1] < losses[0] - 0.4  # a repeated line is learned fast


def test_prompt_completion_loss_on_completion_only(cli, gpt2_run, tmp_path):
    out = tmp_path / "instruct"
    result = cli("finetune", "--model", gpt2_run, *sets(f"data.train_file={FIXTURES / 'instruct.jsonl'}", "training.max_steps=10",
                 "training.learning_rate=3e-3", "data.max_seq_length=48"), "-o", out)
    assert "loss on completions only" in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and summary["global_step"] == 10

    # the tokenized examples mask the prompt tokens out of the labels
    from llmcli.data import tokenized
    from llmcli.data import tokenization
    from llmcli.config import load_config
    from llmcli.data.sources import RawData

    cfg = load_config(None, [f"data.train_file={FIXTURES / 'instruct.jsonl'}", "data.max_seq_length=48"])
    tok = tokenization.load_tokenizer_for(str(gpt2_run), cfg.model)
    ds = tokenized.instruction_datasets(RawData(cfg.data, cfg.training.seed), tok)["train"]
    row = ds[0]
    n_prompt = sum(1 for x in row["labels"] if x == -100)
    assert n_prompt > 0 and row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert row["input_ids"][-1] == tok.eos_token_id


def test_lora_saves_adapter_and_merged_model(cli, bert_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "lora"
    result = cli("finetune", "--model", bert_run, *sets(*CLASSIFIER, f"data.train_file={FIXTURES / 'sentiment_train.jsonl'}",
                 f"data.validation_file={FIXTURES / 'sentiment_dev.jsonl'}", "data.label_column=sentiment",
                 "peft.r=4", "peft.alpha=8", "training.learning_rate=5e-3"), "-o", out)
    assert "LoRA r=4" in result.stderr
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not (out / "model.safetensors").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["merged_model"] == str(out / "merged")
    # the reported accuracy is the merged model's on the dev file, recounted here
    rows = read_jsonl(FIXTURES / "sentiment_dev.jsonl")
    preds = _predict(out / "merged", [r["text"] for r in rows])
    assert len(rows) == 40 and summary["eval_accuracy"] == sum(merged.config.id2label[p] == r["sentiment"] for p, r in zip(preds, rows)) / 40

    # adapter only (peft.merge: false, or merged/ moved away): base + adapter is the same classifier. The
    # adapter holds the head and the pooler BERT's masked-LM base lacks (else redrawn at random on each
    # load), and head_config.json the labels (else LABEL_0/LABEL_1)
    texts = [r["text"] for r in rows[:6]]
    label = ("generate", "--model", out, "--format", "jsonl", *[a for t in texts for a in ("--prompt", t)])
    from_merged = [json.loads(x) for x in cli(*label).stdout.splitlines()]
    (out / "merged").rename(tmp_path / "merged")
    from_adapter = [json.loads(x) for x in cli(*label).stdout.splitlines()]
    assert [r["label"] for r in from_adapter] == [r["label"] for r in from_merged] and len(from_adapter) == 6
    for a, b in zip(from_adapter, from_merged):
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-5)
    from llmcli.config import ModelSection
    from llmcli.errors import ConfigError
    from llmcli.feedback.rewards import check_reward_model

    check_reward_model(str(out), "positive", ModelSection())  # usable as reward.model, adapter only
    with pytest.raises(ConfigError, match="labels: negative, positive"):
        check_reward_model(str(out), "good", ModelSection())
    (tmp_path / "merged").rename(out / "merged")

    # two more steps (a changed training key): the run resumes from checkpoint-60 with the same trainable
    # modules (the pooler too) and its optimizer state, and the adapter still loads
    head = (out / "head_config.json").read_text()
    more = cli("finetune", "--model", bert_run, *sets(*CLASSIFIER, f"data.train_file={FIXTURES / 'sentiment_train.jsonl'}",
               f"data.validation_file={FIXTURES / 'sentiment_dev.jsonl'}", "data.label_column=sentiment",
               "peft.r=4", "peft.alpha=8", "training.learning_rate=5e-3", "training.max_steps=62"), "-o", out)
    assert "checkpoint-60" in more.stderr and json.loads((out / "summary.json").read_text())["resumed_from"] == 60
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == json.loads(
        (out / "checkpoint-60" / "adapter_config.json").read_text())["modules_to_save"]
    assert (out / "head_config.json").read_text() == head

    # LoRA trained its adapters (lora_B starts at zero) and the new head; the base weights are untouched
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [k for k in adapter if "lora_B" in k]
    assert len(lora_b) == 2 * 2 and all(adapter[k].abs().max() > 0 for k in lora_b)  # query, value in 2 layers
    assert {k for k in adapter if "lora_" not in k} == {f"base_model.model.{m}.{w}" for m in ("bert.pooler.dense", "classifier")
                                                     for w in ("weight", "bias")}
    base, tuned = load_file(bert_run / "model.safetensors"), merged.state_dict()
    shared = [k for k in base if k in tuned]
    adapted = [k for k in shared if k.endswith(("query.weight", "value.weight"))]
    assert len(adapted) == 4 and all(not base[k].equal(tuned[k]) for k in adapted)
    assert all(base[k].equal(tuned[k]) for k in shared if k not in adapted)
    assert len(shared) - len(adapted) > 20


def test_lora_classifier_resumes_a_run_that_trained_no_extra_modules(cli, bert_run, tmp_path, monkeypatch):
    """A run started before llmcli trained the base's missing layers (here: the pooler) has no optimizer
    state for them; resuming it keeps its checkpoint's modules_to_save instead of adding the pooler."""
    from llmcli.models import build

    original = build.build_model

    def as_before(*args, **kwargs):
        model = original(*args, **kwargs)
        model.llmcli_new_modules = []  # what a run of the earlier version trained: adapters and head only
        return model

    out = tmp_path / "old"
    args = ("finetune", "--model", bert_run, *sets(*CLASSIFIER, f"data.train_file={FIXTURES / 'sentiment_train.jsonl'}",
            "data.label_column=sentiment", "peft.r=4", "peft.merge=false", "training.save_steps=2"), "-o", out)
    monkeypatch.setattr(build, "build_model", as_before)
    cli(*args, "--set", "training.max_steps=2")
    monkeypatch.setattr(build, "build_model", original)
    saved = json.loads((out / "checkpoint-2" / "adapter_config.json").read_text())["modules_to_save"]
    assert not any("pooler" in m for m in saved)
    cli(*args, "--set", "training.max_steps=4")  # the optimizer state loads: no pooler parameters were added
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 2
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == saved


def _predict(model_dir, texts):
    """Class indices from the saved model, one unpadded example at a time, with transformers only."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        return [int(model(**tok(t, truncation=True, max_length=32, return_tensors="pt")).logits.argmax(-1)) for t in texts]


def test_text_pair_classification_from_csv(cli, bert_run, tmp_path):
    """Two text columns (premise/hypothesis style) from a CSV, with string labels."""
    import csv

    from transformers import AutoModelForSequenceClassification

    rows = [line.split("\t") for line in TSV_TRAIN.read_text().splitlines()[1:]]
    with open(tmp_path / "pairs.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["first", "second", "relation"])
        for (a, la), (b, lb) in zip(rows, rows[1:] + rows[:1]):
            w.writerow([a, b, "same" if la == lb else "different"])
    out = tmp_path / "pair"
    cli("finetune", "--model", bert_run, *sets("training.max_steps=6", f"data.train_file={tmp_path / 'pairs.csv'}",
        "data.text_column=first", "data.text_pair_column=second", "data.label_column=relation", "data.max_seq_length=48"), "-o", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classification" and "eval_f1" in summary
    assert AutoModelForSequenceClassification.from_pretrained(out).config.id2label == {0: "different", 1: "same"}

    from llmcli.data import tokenized
    from llmcli.data import tokenization
    from llmcli.config import load_config
    from llmcli.data.sources import RawData

    cfg = load_config(None, [f"data.train_file={tmp_path / 'pairs.csv'}", "data.text_column=first", "data.text_pair_column=second",
                             "data.label_column=relation", "data.max_seq_length=48"])
    tok = tokenization.load_tokenizer_for(str(bert_run), cfg.model)
    row = tokenized.classification_datasets(RawData(cfg.data, cfg.training.seed), tok, ["different", "same"])["train"][0]
    assert row["input_ids"].count(tok.sep_token_id) == 2  # [CLS] first [SEP] second [SEP]


def test_lora_run_dir_loads_in_generate_and_eval(cli, gpt2_run, tmp_path):
    import shutil

    out = tmp_path / "lora-lm"
    cli("finetune", "--model", gpt2_run, *sets(f"data.train_file={FIXTURES / 'shakespeare_small.txt'}", "data.block_size=32",
        "training.max_steps=3", "peft=true"), "-o", out)
    assert (out / "merged" / "model.safetensors").exists()
    merged = cli("generate", "--model", out, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "6").stdout
    shutil.rmtree(out / "merged")  # adapter only: base model + adapter through peft
    adapter = cli("generate", "--model", out, "--prompt", "ROMEO:", "--temperature", "0", "--max-new-tokens", "6").stdout
    assert merged == adapter and merged.strip()
    result = cli("eval", "--model", out, "--data", FIXTURES / "shakespeare_small.txt", "--max-length", "64", "--json")
    assert json.loads(result.stdout)["task"] == "causal-lm"


def test_finetune_dry_run_and_missing_model(cli, bert_run, tmp_path):
    out = tmp_path / "dry"
    result = cli("finetune", "--model", bert_run, *sets(f"data.train_file={TSV_TRAIN}"), "-o", out, "--dry-run")
    assert "task: auto" in result.stdout and "classification" in result.stderr and not (out / "summary.json").exists()
    result = cli("finetune", *sets(f"data.train_file={TSV_TRAIN}"), "-o", out, expect=2)
    assert "finetune needs a pretrained model" in result.stderr
    # --no-merge is a LoRA option: without a peft: section it is an error, not a switch to LoRA
    result = cli("finetune", "--model", bert_run, *sets(f"data.train_file={TSV_TRAIN}"), "-o", out, "--no-merge", "--dry-run", expect=2)
    assert "--no-merge applies to LoRA runs" in result.stderr and not out.exists()
    result = cli("finetune", "--model", bert_run, *sets(f"data.train_file={TSV_TRAIN}", "peft=true"), "-o", out, "--no-merge", "--dry-run")
    assert "merge: false" in result.stdout


def test_classification_report_comes_from_the_final_evaluation(bert_run, tmp_path):
    """The per-class report and confusion matrix reuse the final evaluation's predictions: no second pass
    over the validation set, except after a resume that evaluated nothing (then one prediction pass)."""
    from transformers import TrainerCallback

    from llmcli.train import finetune
    from llmcli.config import load_config

    class Passes(TrainerCallback):
        def __init__(self):
            self.evaluations, self.predictions = 0, 0

        def on_evaluate(self, args, state, control, **kwargs):
            self.evaluations += 1

        def on_predict(self, args, state, control, **kwargs):
            self.predictions += 1

    def run(out, max_steps):
        cfg = load_config(None, [f"model.model_name_or_path={bert_run}", *CLASSIFIER, f"training.max_steps={max_steps}",
                                 f"data.train_file={FIXTURES / 'sentiment_train.jsonl'}", "data.label_column=sentiment",
                                 f"data.validation_file={FIXTURES / 'sentiment_dev.jsonl'}", f"training.output_dir={out}"],
                          command="finetune")
        passes = Passes()
        summary = finetune.run(cfg, callbacks=(passes,))
        cm = json.loads((out / "confusion_matrix.json").read_text())["matrix"]
        assert summary["confusion_matrix"]["matrix"] == cm and sum(map(sum, cm)) == 40
        assert summary["eval_accuracy"] == (cm[0][0] + cm[1][1]) / 40  # the report is the final evaluation's
        # ... and that of the saved final model, recomputed one sentence at a time (not an earlier evaluation's)
        truth, preds = [["negative", "positive"].index(r["sentiment"]) for r in dev], _predict(out, [r["text"] for r in dev])
        assert cm == [[sum(1 for y, p in zip(truth, preds) if (y, p) == (t, q)) for q in (0, 1)] for t in (0, 1)]
        return passes

    dev = read_jsonl(FIXTURES / "sentiment_dev.jsonl")

    # evaluations at steps 30 and 60 (the last step: reused as the final evaluation)
    passes = run(tmp_path / "a", 60)
    assert (passes.evaluations, passes.predictions) == (2, 0)
    # evaluation at step 30, then the final evaluation at step 50
    passes = run(tmp_path / "b", 50)
    assert (passes.evaluations, passes.predictions) == (2, 0)
    # killed after the checkpoint of the last step, before the final save: the resumed run trains and
    # evaluates nothing, so the report needs one prediction pass
    (tmp_path / "a" / "summary.json").unlink()
    passes = run(tmp_path / "a", 60)
    assert (passes.evaluations, passes.predictions) == (0, 1)
