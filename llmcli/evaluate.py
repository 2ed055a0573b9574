"""`llmcli eval`: perplexity (and bits per byte) for LMs, accuracy/precision/recall/F1 for classifiers.

    llmcli eval --model runs/shakespeare --data data/tinyshakespeare.txt
    llmcli eval --model gpt2 --config configs/eval-wikitext.yaml --json
    llmcli eval --model runs/sst2 --data dev.tsv --errors wrong.jsonl --fail-under accuracy=0.9

Causal LMs (the protocol is printed and saved with every number):
- the evaluation text is a plain-text file's exact contents, or a dataset's documents joined
  with "\\n\\n"; it is tokenized once, with no BOS unless --add-bos;
- windows of at most `max_length` tokens: window 0 is tokens [0, max_length); each next window
  ends `stride` tokens later and starts `max_length` tokens before its end; it scores the tokens
  it adds, with everything before them in the window as context. With stride < max_length this
  is exactly the Transformers perplexity guide. When a window would start at or after the
  previous window's end (stride = max_length), it starts instead on the previous window's last
  scored token, as lm-eval's rolling windows do, so no token is skipped;
- every token after the first is scored exactly once: `tokens_scored` = tokens - 1 (per document
  with --per-document);
- nll = mean negative log-likelihood per scored token (nats); perplexity = exp(nll);
  bits_per_byte = total NLL / (UTF-8 bytes x ln 2); byte_perplexity = exp(total NLL / bytes);
  word_perplexity = exp(total NLL / whitespace-separated words), as lm-evaluation-harness.
Masked LMs: masked-token loss and accuracy with BERT's 15% masking (80/10/10) from a fixed seed.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from llmcli import console, data, metrics, modeling
from llmcli.config import Config
from llmcli.errors import ConfigError, GateFailed

LM_METRICS = ("nll", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity", "tokens_scored", "bytes", "words")
MLM_METRICS = ("mlm_loss", "mlm_accuracy", "perplexity", "masked_tokens")
CLASSIFIER_METRICS = ("accuracy", "precision", "recall", "f1", "examples")


def run(cfg: Config, checkpoint: str | None = None, as_json: bool = False, output_path: str | None = None,
        errors_path: str | None = None, device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    if not cfg.model.model_name_or_path:
        raise ConfigError("eval needs a model: pass --model (hub id, model dir or llmcli run dir)")
    path = modeling.resolve_model_path(cfg.model.model_name_or_path, checkpoint)
    start = time.perf_counter()
    model, tokenizer, kind = modeling.load_for_inference(path, cfg.model, device, dtype)
    task = {"classifier": "classification"}.get(kind, kind)
    _check_gate_names(cfg, task)

    if task == "classification":
        result_metrics, protocol = _eval_classifier(model, tokenizer, cfg, errors_path)
    elif task == "masked-lm":
        result_metrics, protocol = _eval_masked_lm(model, tokenizer, cfg)
    else:
        result_metrics, protocol = _eval_causal_lm(model, tokenizer, cfg)

    from llmcli.dist import is_main_process

    if not is_main_process():
        return {}  # under accelerate every rank computes the same numbers; the main process reports them
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
# Causal LMs


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, score_from, end) per window over tokens [0, n_tokens): the window's input is
    tokens [begin, end) and it scores tokens [score_from, end). See the module docstring."""
    if n_tokens < 2:
        return []
    out = []
    end = min(max_length, n_tokens)
    out.append((0, 1, end))
    while end < n_tokens:
        prev_end = end
        end = min(prev_end + stride, n_tokens)
        begin = max(0, end - max_length)
        if begin >= prev_end:  # stride = max_length: start on the previous window's last scored token
            begin = prev_end - 1
            end = min(begin + max_length, n_tokens)
        out.append((begin, prev_end, end))
    return out


def _eval_causal_lm(model, tokenizer, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    e = cfg.eval
    context = modeling.context_length(model.config) or 1024
    max_length = e.max_length or context
    if max_length > context:
        raise ConfigError(f"eval.max_length={max_length} is larger than the model's context ({context} tokens)")
    stride = e.stride or max_length
    if stride > max_length:
        raise ConfigError(f"eval.stride={stride} must not exceed eval.max_length={max_length}")
    if e.add_bos and tokenizer.bos_token_id is None:
        raise ConfigError("--add-bos: this tokenizer has no BOS token")

    docs, plain = data.eval_documents(cfg.data, e.split)
    if e.per_document:
        texts = [d for d in (re.split(r"\n\s*\n", "\n\n".join(docs)) if plain else docs) if d.strip()]
    else:
        texts = ["\n\n".join(docs)]
    jobs = []  # (token ids, windows)
    n_bytes = n_words = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if e.add_bos:
            ids = [tokenizer.bos_token_id] + ids
        jobs.append((ids, windows(len(ids), max_length, stride)))
        n_bytes += len(text.encode("utf-8"))
        n_words += len(text.split())
    if not any(w for _, w in jobs):
        raise ConfigError("the evaluation text has fewer than 2 tokens: nothing to score")

    total_nll, scored = 0.0, 0
    flat = [(ids, w) for ids, ws in jobs for w in ws]
    with console.progress("eval", total=len(flat)) as bar, torch.inference_mode():
        for b in range(0, len(flat), e.batch_size):
            nll, count = _score_windows(model, flat[b : b + e.batch_size], tokenizer)
            total_nll += nll
            scored += count
            bar.advance(min(e.batch_size, len(flat) - b))
    mean = total_nll / scored
    result = {
        "nll": mean,
        "perplexity": _exp(mean),
        "bits_per_byte": total_nll / (n_bytes * math.log(2)),
        "byte_perplexity": _exp(total_nll / n_bytes),
        "word_perplexity": _exp(total_nll / n_words) if n_words else None,
        "tokens_scored": scored,
        "bytes": n_bytes,
        "words": n_words,
        "documents": len(texts),
    }
    protocol = {
        "max_length": max_length, "stride": stride, "add_bos": e.add_bos,
        "documents": "scored one by one" if e.per_document else "joined with \\n\\n into one text",
        "windows": sum(len(w) for _, w in jobs),
        "definition": "sliding windows; every token after the first scored once (llmcli eval --help / README)",
    }
    return result, protocol


def _score_windows(model, batch, tokenizer) -> tuple[float, int]:
    """Summed NLL and count of the scored tokens of a batch of windows (right-padded)."""
    import torch

    width = max(end - begin for _, (begin, _, end) in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (ids, (begin, score_from, end)) in enumerate(batch):
        span = torch.tensor(ids[begin:end])
        input_ids[row, : end - begin] = span
        mask[row, : end - begin] = 1
        labels[row, score_from - begin : end - begin] = span[score_from - begin :]
    input_ids, mask, labels = (t.to(model.device) for t in (input_ids, mask, labels))
    logits = model(input_ids=input_ids, attention_mask=mask).logits
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return nll.item(), int((shift_labels != -100).sum().item())


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


# --------------------------------------------------------------------------------------------
# Masked LMs


def _eval_masked_lm(model, tokenizer, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    e = cfg.eval
    if tokenizer.mask_token_id is None:
        raise ConfigError("this masked LM's tokenizer has no mask token")
    context = modeling.context_length(model.config) or 512
    max_length = min(e.max_length or context, context)
    docs, _ = data.eval_documents(cfg.data, e.split)
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    body = max_length - 2
    blocks = [[tokenizer.cls_token_id] + ids[i : i + body] + [tokenizer.sep_token_id] for i in range(0, len(ids), body)]
    generator = torch.Generator().manual_seed(0)
    total_loss, total_correct, total_masked = 0.0, 0, 0
    with console.progress("eval", total=len(blocks)) as bar, torch.inference_mode():
        for b in range(0, len(blocks), e.batch_size):
            chunk = blocks[b : b + e.batch_size]
            width = max(len(x) for x in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, block in enumerate(chunk):
                input_ids[row, : len(block)] = torch.tensor(block)
                mask[row, : len(block)] = 1
            special = (input_ids == tokenizer.cls_token_id) | (input_ids == tokenizer.sep_token_id) | (mask == 0)
            chosen = (torch.rand(input_ids.shape, generator=generator) < cfg.data.mlm_probability) & ~special
            labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
            action = torch.rand(input_ids.shape, generator=generator)
            random_ids = torch.randint(len(tokenizer), input_ids.shape, generator=generator)
            masked = input_ids.clone()
            masked[chosen & (action < 0.8)] = tokenizer.mask_token_id
            swap = chosen & (action >= 0.8) & (action < 0.9)
            masked[swap] = random_ids[swap]
            logits = model(input_ids=masked.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
            sel = labels != -100
            total_loss += torch.nn.functional.cross_entropy(logits[sel], labels[sel], reduction="sum").item()
            total_correct += int((logits[sel].argmax(-1) == labels[sel]).sum())
            total_masked += int(sel.sum())
            bar.advance(len(chunk))
    if total_masked == 0:
        raise ConfigError("the evaluation text is too short: no token was masked")
    loss = total_loss / total_masked
    result = {"mlm_loss": loss, "mlm_accuracy": total_correct / total_masked, "perplexity": _exp(loss), "masked_tokens": total_masked}
    protocol = {"max_length": max_length, "mlm_probability": cfg.data.mlm_probability, "seed": 0,
                "definition": "BERT masking (80% [MASK], 10% random, 10% kept) of non-special tokens, fixed seed"}
    return result, protocol


# --------------------------------------------------------------------------------------------
# Classifiers


def _eval_classifier(model, tokenizer, cfg: Config, errors_path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch
    from transformers import DataCollatorWithPadding

    label2id = modeling.user_labels(model.config) or {str(k): int(v) for k, v in model.config.label2id.items()}
    label_names = [name for name, _ in sorted(label2id.items(), key=lambda kv: kv[1])]
    raw = data.load_eval_split(cfg.data, cfg.eval.split)
    text_col, pair_col, label_col = data.classification_columns(raw, cfg.data)
    encoded = data.tokenize_classification(raw, tokenizer, label2id, cfg.data, "evaluation")
    tokenizer.padding_side = "right"  # absolute position embeddings (BERT, GPT-2) must start at 0
    collate = DataCollatorWithPadding(tokenizer)
    preds, labels, scores = [], [], []
    bs = cfg.eval.batch_size
    with console.progress("eval", total=len(encoded)) as bar, torch.inference_mode():
        for b in range(0, len(encoded), bs):
            batch = collate([encoded[i] for i in range(b, min(b + bs, len(encoded)))])
            y = batch.pop("labels")
            logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.float().cpu()
            probs = torch.softmax(logits, -1)
            preds += probs.argmax(-1).tolist()
            scores += probs.max(-1).values.tolist()
            labels += y.tolist()
            bar.advance(len(y))
    report = metrics.classification_report(labels, preds, label_names)
    if errors_path:
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
    return result, protocol


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
    known = {"classification": CLASSIFIER_METRICS, "masked-lm": MLM_METRICS}.get(task, LM_METRICS)
    for name in list(cfg.eval.fail_under) + list(cfg.eval.fail_over):
        if name not in known:
            raise ConfigError(f"--fail-under/--fail-over: unknown metric '{name}' for {task} (metrics: {', '.join(known)})")


def _apply_gates(cfg: Config, result: dict[str, Any]) -> None:
    failed = [f"{k}={result[k]:.6g} < {v}" for k, v in cfg.eval.fail_under.items() if result.get(k) is not None and result[k] < v]
    failed += [f"{k}={result[k]:.6g} > {v}" for k, v in cfg.eval.fail_over.items() if result.get(k) is not None and result[k] > v]
    if failed:
        raise GateFailed("evaluation gate failed: " + "; ".join(failed))
