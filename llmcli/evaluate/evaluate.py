"""`llmcli eval`: perplexity (and bits per byte) for LMs, accuracy/precision/recall/F1 for classifiers.

    llmcli eval --model runs/shakespeare --data data/tinyshakespeare.txt
    llmcli eval --model gpt2 --config configs/eval-wikitext.yaml --json
    llmcli eval --model runs/sst2 --data dev.tsv --errors wrong.jsonl --fail-under accuracy=0.9

Causal LMs (the protocol is printed and saved with every number):
- the evaluation text is a plain-text file's exact contents, or a dataset's documents joined
  with "\\n\\n" (--per-document: each document on its own); it is tokenized once, with no BOS
  unless --add-bos. Token 0 (the BOS with --add-bos) is context only; every later token is
  scored exactly once, so `tokens_scored` = tokens - 1 per text;
- stride = max_length (the default): lm-eval's `loglikelihood_rolling` windows, with token 0 as
  its prefix token: the first window reads tokens [0, L) and predicts tokens [1, L+1); each next
  window predicts the next L tokens (fewer at the end) from the L tokens before its last target;
- stride < max_length: the Transformers perplexity guide's loop: windows [b, b+L) for b in
  0, stride, 2*stride, ... until one reaches the end, each scoring the tokens that no earlier
  window scored;
- nll = mean negative log-likelihood per scored token (nats); perplexity = exp(nll);
  bits_per_byte = total NLL / (UTF-8 bytes x ln 2); byte_perplexity = exp(total NLL / bytes);
  word_perplexity = exp(total NLL / words), words = len(re.split(r"\\s+", text)) per text, as
  lm-evaluation-harness's wikitext task counts them.
Masked LMs: masked-token loss and accuracy with BERT's 15% masking (80/10/10); block i's mask is
drawn from a generator seeded with i, so numbers do not depend on batch size or process count.
Under accelerate (--num-processes N), windows/blocks/examples are split across the ranks and the
sums reduced, so the numbers equal a single process's; only the main process reports them.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from llmcli import console
from llmcli.config import Config
from llmcli.data import tokenized
from llmcli.dist import distributed_state, is_distributed, is_main_process, main_process_first, rank_and_world
from llmcli.errors import ConfigError, GateFailed
from llmcli.evaluate import metrics
from llmcli.evaluate.perplexity import LM_METRICS, MLM_METRICS, eval_causal_lm, eval_masked_lm
from llmcli.models import heads, load

CLASSIFIER_METRICS = ("accuracy", "precision", "recall", "f1", "examples")
REWARD_METRICS = ("preference_accuracy", "preference_margin", "preference_pairs")


def run(cfg: Config, checkpoint: str | None = None, as_json: bool = False, output_path: str | None = None,
        errors_path: str | None = None, device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    if not cfg.model.model_name_or_path:
        raise ConfigError("eval needs a model: pass --model (hub id, model dir or llmcli run dir)")
    path = load.resolve_model_path(cfg.model.model_name_or_path, checkpoint)
    start = time.perf_counter()
    if device is None and is_distributed():
        device = str(distributed_state().device)  # each rank on its own device
    model, tokenizer, kind = load.load_for_inference(path, cfg.model, device, dtype)
    task = {"classifier": "classification"}.get(kind, kind)
    if task == "classification" and heads.is_reward_model(model.config):
        task = "reward"
    _check_gate_names(cfg, task)

    if task == "reward":
        result_metrics, protocol = _eval_reward_model(model, tokenizer, cfg)
    elif task == "classification":
        result_metrics, protocol = _eval_classifier(model, tokenizer, cfg, errors_path)
    elif task == "masked-lm":
        result_metrics, protocol = eval_masked_lm(model, tokenizer, cfg)
    else:
        result_metrics, protocol = eval_causal_lm(model, tokenizer, cfg)
    protocol.update(device=str(model.device), dtype=str(model.dtype).removeprefix("torch."), processes=rank_and_world()[1],
                    runtime=getattr(model, "runtime", "torch"))

    if not is_main_process():
        return {}  # the ranks hold the same reduced numbers; the main process reports them
    result = {
        "model": path,
        "task": task,
        "data": _describe_data(cfg),
        "protocol": protocol,
        "metrics": result_metrics,
        "runtime_s": round(time.perf_counter() - start, 3),
    }
    if output_path:
        Path(output_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    else:
        _print_table(result)
    _apply_gates(cfg, result_metrics)
    return result


def _describe_data(cfg: Config) -> str:
    d = cfg.data
    if d.validation_file or d.train_file:
        spec = d.validation_file or d.train_file
        return ", ".join(spec) if isinstance(spec, list) else spec
    return f"{d.dataset_name}/{d.dataset_config_name or ''}:{cfg.eval.split}" if d.dataset_name else ""



# --------------------------------------------------------------------------------------------
# Classifiers


def _eval_classifier(model, tokenizer, cfg: Config, errors_path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch
    from transformers import DataCollatorWithPadding

    with main_process_first():
        raw = tokenized.load_eval_split(cfg.data, cfg.eval.split)
    text_col, pair_col, label_col = tokenized.classification_columns(raw, cfg.data)
    label_names, label2id, mapping = _model_labels(model.config, raw.features[label_col], raw[label_col])
    encoded = tokenized.tokenize_classification(raw, tokenizer, label2id, cfg.data, _split_name(cfg))
    tokenizer.padding_side = "right"  # absolute position embeddings (BERT, GPT-2) must start at 0
    collate = DataCollatorWithPadding(tokenizer)
    rank, world = rank_and_world()
    mine = list(range(len(encoded)))[rank::world]
    rows = []  # (index, label, prediction, score)
    bs = cfg.eval.batch_size
    with console.progress("eval", total=len(mine)) as bar, torch.inference_mode():
        for b in range(0, len(mine), bs):
            chunk = mine[b : b + bs]
            batch = collate([encoded[i] for i in chunk])
            y = batch.pop("labels")
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()
            probs = torch.softmax(logits, -1)
            rows += zip(chunk, y.tolist(), probs.argmax(-1).tolist(), probs.max(-1).values.tolist())
            bar.advance(len(chunk))
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rows)
        rows = sorted(r for part in gathered for r in part)
    labels, preds, scores = [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]
    report = metrics.classification_report(labels, preds, label_names)
    if errors_path and is_main_process():
        with open(errors_path, "w", encoding="utf-8") as fh:
            for i, (y, p) in enumerate(zip(labels, preds)):
                if y != p:
                    row = {"index": i, "text": raw[i][text_col]}
                    if pair_col:
                        row["text_pair"] = raw[i][pair_col]
                    row.update(label=label_names[y], predicted=label_names[p], score=scores[i])
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    result = {k: report[k] for k in ("accuracy", "precision", "recall", "f1")}
    result.update(examples=len(labels), per_class=report["per_class"], confusion_matrix=report["confusion_matrix"])
    protocol = {"max_seq_length": cfg.data.max_seq_length, "averaging": "macro over classes", "labels": label_names}
    if mapping:
        protocol["label_mapping"] = mapping
    return result, protocol


def _eval_reward_model(model, tokenizer, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """A reward model (`task: reward`) on preference pairs: how often it scores chosen above rejected."""
    from llmcli.data import preferences
    from llmcli.evaluate import scoring

    with main_process_first():
        pairs = preferences.eval_pairs(cfg.data, cfg.eval.split)
    result = scoring.preference_accuracy(scoring.Scorer(model, tokenizer, cfg.eval.batch_size), pairs)
    protocol = {"score": "the model's one logit for prompt + response + EOS (chat template for conversations)",
                "accuracy": "share of pairs with score(chosen) > score(rejected); ties count as wrong"}
    return result, protocol


def _model_labels(config, feature, values) -> tuple[list[str], dict[str, int], str | None]:
    """(label names by id, data label -> id, how integer labels were mapped). A classifier with its
    own label names maps data labels by name; when the data's labels are instead exactly integers in
    0..K-1 (SST-2's 0/1 against negative/positive), label i is the model's class i, and the output
    says so. One with the library's LABEL_0.. placeholders maps them by index: integer labels, a
    ClassLabel's ids (reported under its names) or the placeholder strings themselves."""
    named = load.user_labels(config)
    if named:
        label_names = [name for name, _ in sorted(named.items(), key=lambda kv: kv[1])]
        keys = {tokenized.label_key(v, getattr(feature, "names", None)) for v in values if v is not None}
        index = {str(i): i for i in range(len(label_names))}
        if keys and not keys & set(named) and keys <= set(index):
            mapping = "integer labels by class index: " + ", ".join(f"{i}={n}" for i, n in enumerate(label_names))
            console.info(f"the data's labels are integers, the model's are named: {mapping}")
            return label_names, {**named, **index}, mapping
        return label_names, named, None
    n = config.num_labels
    names = list(getattr(feature, "names", None) or [])
    label_names = names if len(names) == n else [str(i) for i in range(n)]
    by_index: dict[str, int] = {}
    for keys in (label_names, names[:n], [str(i) for i in range(n)], [f"LABEL_{i}" for i in range(n)]):
        for i, key in enumerate(keys):
            by_index.setdefault(key, i)  # a ClassLabel's own names win over digit strings
    return label_names, by_index, None


def _split_name(cfg: Config) -> str:
    """How the label checks name the evaluated data: a hub split, or the file."""
    d = cfg.data
    if d.validation_file or d.train_file:
        return _describe_data(cfg)
    return f"'{cfg.eval.split}' split of {d.dataset_name}"


# --------------------------------------------------------------------------------------------
# Output and gates


def _print_table(result: dict[str, Any]) -> None:
    m = result["metrics"]
    rows = [(k, v) for k, v in m.items() if not isinstance(v, dict)]
    rows += [(f"{k} (protocol)", v) for k, v in result["protocol"].items() if k != "definition"]
    console.table(f"eval: {result['model']} on {result['data']} ({result['task']})", rows)
    if "per_class" in m:
        per = [(name, f"P {c['precision']:.3f}  R {c['recall']:.3f}  F1 {c['f1']:.3f}  n {c['support']}") for name, c in m["per_class"].items()]
        console.table("per class", per)
        cm = m["confusion_matrix"]
        console.table("confusion matrix (rows: true, columns: predicted)",
                      [(name, "  ".join(str(x) for x in row)) for name, row in zip(cm["labels"], cm["matrix"])])


def _check_gate_names(cfg: Config, task: str) -> None:
    known = {"classification": CLASSIFIER_METRICS, "masked-lm": MLM_METRICS, "reward": REWARD_METRICS}.get(task, LM_METRICS)
    for name in list(cfg.eval.fail_under) + list(cfg.eval.fail_over):
        if name not in known:
            raise ConfigError(f"--fail-under/--fail-over: unknown metric '{name}' for {task} (metrics: {', '.join(known)})")


def _apply_gates(cfg: Config, result: dict[str, Any]) -> None:
    failed = [f"{k}={result[k]:.6g} < {v}" for k, v in cfg.eval.fail_under.items() if result.get(k) is not None and result[k] < v]
    failed += [f"{k}={result[k]:.6g} > {v}" for k, v in cfg.eval.fail_over.items() if result.get(k) is not None and result[k] > v]
    if failed:
        raise GateFailed("evaluation gate failed: " + "; ".join(failed))
