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
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from llmcli import console, data, metrics, modeling, tasks
from llmcli.config import Config
from llmcli.errors import ConfigError, GateFailed
from llmcli.dist import distributed_state, is_distributed, is_main_process, main_process_first

LM_METRICS = ("nll", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity", "tokens_scored", "bytes", "words")
MLM_METRICS = ("mlm_loss", "mlm_accuracy", "perplexity", "masked_tokens")
CLASSIFIER_METRICS = ("accuracy", "precision", "recall", "f1", "examples")
REWARD_METRICS = ("preference_accuracy", "preference_margin", "preference_pairs")


def run(cfg: Config, checkpoint: str | None = None, as_json: bool = False, output_path: str | None = None,
        errors_path: str | None = None, device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    if not cfg.model.model_name_or_path:
        raise ConfigError("eval needs a model: pass --model (hub id, model dir or llmcli run dir)")
    path = modeling.resolve_model_path(cfg.model.model_name_or_path, checkpoint)
    start = time.perf_counter()
    if device is None and is_distributed():
        device = str(distributed_state().device)  # each rank on its own device
    model, tokenizer, kind = modeling.load_for_inference(path, cfg.model, device, dtype)
    task = {"classifier": "classification"}.get(kind, kind)
    if task == "classification" and tasks.is_reward_model(model.config):
        task = "reward"
    _check_gate_names(cfg, task)

    if task == "reward":
        result_metrics, protocol = _eval_reward_model(model, tokenizer, cfg)
    elif task == "classification":
        result_metrics, protocol = _eval_classifier(model, tokenizer, cfg, errors_path)
    elif task == "masked-lm":
        result_metrics, protocol = _eval_masked_lm(model, tokenizer, cfg)
    else:
        result_metrics, protocol = _eval_causal_lm(model, tokenizer, cfg)
    protocol.update(device=str(model.device), dtype=str(model.dtype).removeprefix("torch."), processes=_rank_and_world()[1])

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
# Causal LMs


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, score_from, end) per window over tokens [0, n_tokens): the model reads tokens
    [begin, end - 1) (at most `max_length`) and scores tokens [score_from, end), each predicted
    from the tokens before it in the window. Token 0 is context only; every later token is scored
    once. stride >= max_length: lm-eval's rolling windows (token 0 as the prefix token);
    otherwise the Transformers perplexity guide's placement. See the module docstring."""
    if n_tokens < 2:
        return []
    if stride >= max_length:
        # lm_eval.utils.get_rolling_token_windows(tokens[1:], prefix_token=tokens[0], max_length, context_len=1)
        # + make_disjoint_window: window 0 reads [0, L) and predicts [1, L+1); then each window predicts
        # the next L tokens from the L tokens before its last target
        end = min(max_length + 1, n_tokens)
        out = [(0, 1, end)]
        while end < n_tokens:
            prev_end, end = end, min(end + max_length, n_tokens)
            out.append((end - max_length - 1, prev_end, end))
        return out
    # the guide: for begin in range(0, n, stride): end = min(begin + L, n); trg_len = end - prev_end
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, max(prev_end, 1), end))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _eval_causal_lm(model, tokenizer, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    e = cfg.eval
    context = modeling.context_length(model.config) or 1024
    max_length = e.max_length or context
    if max_length > context and modeling.context_is_a_limit(model.config):
        raise ConfigError(f"eval.max_length={max_length} is larger than the model's context ({context} tokens)")
    stride = e.stride or max_length
    if stride > max_length:
        raise ConfigError(f"eval.stride={stride} must not exceed eval.max_length={max_length}")
    if e.add_bos and tokenizer.bos_token_id is None:
        raise ConfigError("--add-bos: this tokenizer has no BOS token")

    with main_process_first():  # ranks share the datasets cache
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
        n_words += len(re.split(r"\s+", text))  # lm-eval's wikitext count: leading/trailing whitespace adds an empty word
    if not any(w for _, w in jobs):
        raise ConfigError("the evaluation text has fewer than 2 tokens: nothing to score")

    flat = [(ids, w) for ids, ws in jobs for w in ws]
    rank, world = _rank_and_world()
    mine = flat[rank::world]
    total_nll, scored = 0.0, 0
    with console.progress("eval", total=len(mine)) as bar, torch.inference_mode():
        for b in range(0, len(mine), e.batch_size):
            nll, count = _score_windows(model, mine[b : b + e.batch_size], tokenizer)
            total_nll += nll
            scored += count
            bar.advance(min(e.batch_size, len(mine) - b))
    total_nll, scored = _sum_across_ranks([total_nll, scored])
    scored = int(scored)
    mean = total_nll / scored
    result = {
        "nll": mean,
        "perplexity": _exp(mean),
        "bits_per_byte": total_nll / (n_bytes * math.log(2)),
        "byte_perplexity": _exp(total_nll / n_bytes),
        "word_perplexity": _exp(total_nll / n_words),
        "tokens_scored": scored,
        "bytes": n_bytes,
        "words": n_words,
        "documents": len(texts),
    }
    protocol = {
        "max_length": max_length, "stride": stride, "add_bos": e.add_bos,
        "documents": "scored one by one" if e.per_document else "joined with \\n\\n into one text",
        "windows": len(flat),
        "max_length_from": ("--max-length" if e.max_length else "the model's context" if modeling.context_is_a_limit(model.config)
                            else "the model's default window (max_position_embeddings; it has no context limit)"),
        "definition": ("lm-eval loglikelihood_rolling windows (token 0 as prefix)" if stride == max_length
                       else "Transformers perplexity guide sliding windows") + "; every token after the first scored once",
    }
    return result, protocol


def _score_windows(model, batch, tokenizer) -> tuple[float, int]:
    """Summed NLL (float64 over per-token fp32 losses) and count of the scored tokens of a batch
    of windows (right-padded)."""
    import torch

    width = max(end - 1 - begin for _, (begin, _, end) in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    targets = torch.full((len(batch), width), -100, dtype=torch.long)  # targets[r, j]: the token after input j
    for row, (ids, (begin, score_from, end)) in enumerate(batch):
        n = end - 1 - begin
        input_ids[row, :n] = torch.tensor(ids[begin : end - 1])
        mask[row, :n] = 1
        targets[row, score_from - 1 - begin : n] = torch.tensor(ids[score_from:end])
    input_ids, mask, targets = (t.to(model.device) for t in (input_ids, mask, targets))
    logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none")
    return losses.double().sum().item(), int((targets != -100).sum().item())


def _rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    state = distributed_state()
    return state.process_index, state.num_processes


def _sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks (float64 all-reduce); the values themselves in one process."""
    if not is_distributed():
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=distributed_state().device)
    dist.all_reduce(tensor)
    return tensor.tolist()


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
    with main_process_first():
        docs, _ = data.eval_documents(cfg.data, e.split)
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    body = max_length - 2
    blocks = [[tokenizer.cls_token_id] + ids[i : i + body] + [tokenizer.sep_token_id] for i in range(0, len(ids), body)]
    rank, world = _rank_and_world()
    mine = list(range(len(blocks)))[rank::world]
    total_loss, total_correct, total_masked = 0.0, 0, 0
    with console.progress("eval", total=len(mine)) as bar, torch.inference_mode():
        for b in range(0, len(mine), e.batch_size):
            chunk = mine[b : b + e.batch_size]
            width = max(len(blocks[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            labels = torch.full_like(input_ids, -100)
            mask = torch.zeros_like(input_ids)
            for row, i in enumerate(chunk):
                masked, block_labels = mask_block(blocks[i], i, tokenizer, cfg.data.mlm_probability)
                input_ids[row, : len(masked)] = masked
                labels[row, : len(masked)] = block_labels
                mask[row, : len(masked)] = 1
            logits = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device)).logits.float().cpu()
            sel = labels != -100
            losses = torch.nn.functional.cross_entropy(logits[sel], labels[sel], reduction="none")
            total_loss += losses.double().sum().item()
            total_correct += int((logits[sel].argmax(-1) == labels[sel]).sum())
            total_masked += int(sel.sum())
            bar.advance(len(chunk))
    total_loss, total_correct, total_masked = _sum_across_ranks([total_loss, total_correct, total_masked])
    total_correct, total_masked = int(total_correct), int(total_masked)
    if total_masked == 0:
        raise ConfigError("the evaluation text is too short: no token was masked")
    loss = total_loss / total_masked
    result = {"mlm_loss": loss, "mlm_accuracy": total_correct / total_masked, "perplexity": _exp(loss), "masked_tokens": total_masked}
    protocol = {"max_length": max_length, "mlm_probability": cfg.data.mlm_probability, "blocks": len(blocks),
                "definition": "BERT masking (80% [MASK], 10% random, 10% kept) of non-special tokens; block i drawn with seed i"}
    return result, protocol


def mask_block(block: list[int], index: int, tokenizer, probability: float):
    """(masked input, labels) of one [CLS] ... [SEP] block: each non-special token is chosen with
    `probability` (rand < p); a chosen token becomes [MASK] if its second draw is < 0.8, a random
    token if < 0.9, else stays. The three draws (rand, rand, randint over the vocabulary), in that
    order, come from `torch.Generator().manual_seed(index)`."""
    import torch

    generator = torch.Generator().manual_seed(index)
    ids = torch.tensor(block)
    special = (ids == tokenizer.cls_token_id) | (ids == tokenizer.sep_token_id)
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & ~special
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(len(tokenizer), ids.shape, generator=generator)
    masked = ids.clone()
    masked[chosen & (action < 0.8)] = tokenizer.mask_token_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    masked[swap] = random_ids[swap]
    return masked, torch.where(chosen, ids, torch.full_like(ids, -100))


# --------------------------------------------------------------------------------------------
# Classifiers


def _eval_classifier(model, tokenizer, cfg: Config, errors_path: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch
    from transformers import DataCollatorWithPadding

    with main_process_first():
        raw = data.load_eval_split(cfg.data, cfg.eval.split)
    text_col, pair_col, label_col = data.classification_columns(raw, cfg.data)
    label_names, label2id = _model_labels(model.config, raw.features[label_col])
    encoded = data.tokenize_classification(raw, tokenizer, label2id, cfg.data, _split_name(cfg))
    tokenizer.padding_side = "right"  # absolute position embeddings (BERT, GPT-2) must start at 0
    collate = DataCollatorWithPadding(tokenizer)
    rank, world = _rank_and_world()
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
    return result, protocol


def _eval_reward_model(model, tokenizer, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    """A reward model (`task: reward`) on preference pairs: how often it scores chosen above rejected."""
    from llmcli import preferences, rewards

    with main_process_first():
        pairs = preferences.eval_pairs(cfg.data, cfg.eval.split)
    result = rewards.preference_accuracy(rewards.RewardScorer(model, tokenizer, cfg.eval.batch_size), pairs)
    protocol = {"score": "the model's one logit for prompt + response + EOS (chat template for conversations)",
                "accuracy": "share of pairs with score(chosen) > score(rejected); ties count as wrong"}
    return result, protocol


def _model_labels(config, feature) -> tuple[list[str], dict[str, int]]:
    """(label names by id, data label -> id). A classifier with its own label names maps data labels
    by name; one with the library's LABEL_0.. placeholders maps them by index: integer labels, a
    ClassLabel's ids (reported under its names) or the placeholder strings themselves."""
    named = modeling.user_labels(config)
    if named:
        return [name for name, _ in sorted(named.items(), key=lambda kv: kv[1])], named
    n = config.num_labels
    names = list(getattr(feature, "names", None) or [])
    label_names = names if len(names) == n else [str(i) for i in range(n)]
    by_index: dict[str, int] = {}
    for keys in (label_names, names[:n], [str(i) for i in range(n)], [f"LABEL_{i}" for i in range(n)]):
        for i, key in enumerate(keys):
            by_index.setdefault(key, i)  # a ClassLabel's own names win over digit strings
    return label_names, by_index


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
