"""LM scoring for `llmcli eval`: lm-eval's rolling windows, the Transformers guide's sliding windows,
and masked-token loss with seeded BERT masking; llmcli/evaluate/evaluate.py's docstring gives the protocol.
"""

from __future__ import annotations

import math
import re
from typing import Any

from llmcli import console
from llmcli.config import Config
from llmcli.data import tokenized
from llmcli.dist import distributed_state, is_distributed, main_process_first, rank_and_world
from llmcli.errors import ConfigError
from llmcli.evaluate.metrics import safe_exp
from llmcli.models import load

LM_METRICS = ("nll", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity", "tokens_scored", "bytes", "words")
MLM_METRICS = ("mlm_loss", "mlm_accuracy", "perplexity", "masked_tokens")


# --------------------------------------------------------------------------------------------
# Causal LMs


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, score_from, end) per window over tokens [0, n_tokens): the model reads tokens
    [begin, end - 1) (at most `max_length`) and scores tokens [score_from, end), each predicted
    from the tokens before it in the window. Token 0 is context only; every later token is scored
    once. stride >= max_length: lm-eval's rolling windows (token 0 as the prefix token);
    otherwise the Transformers perplexity guide's placement. See llmcli/evaluate/evaluate.py's docstring."""
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


def eval_causal_lm(model, tokenizer, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    e = cfg.eval
    context = load.context_length(model.config) or 1024
    max_length = e.max_length or context
    if max_length > context and load.context_is_a_limit(model.config):
        raise ConfigError(f"eval.max_length={max_length} is larger than the model's context ({context} tokens)")
    stride = e.stride or max_length
    if stride > max_length:
        raise ConfigError(f"eval.stride={stride} must not exceed eval.max_length={max_length}")
    if e.add_bos and tokenizer.bos_token_id is None:
        raise ConfigError("--add-bos: this tokenizer has no BOS token")

    with main_process_first():  # ranks share the datasets cache
        docs, plain = tokenized.eval_documents(cfg.data, e.split)
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
    rank, world = rank_and_world()
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
        "perplexity": safe_exp(mean),
        "bits_per_byte": total_nll / (n_bytes * math.log(2)),
        "byte_perplexity": safe_exp(total_nll / n_bytes),
        "word_perplexity": safe_exp(total_nll / n_words),
        "tokens_scored": scored,
        "bytes": n_bytes,
        "words": n_words,
        "documents": len(texts),
    }
    protocol = {
        "max_length": max_length, "stride": stride, "add_bos": e.add_bos,
        "documents": "scored one by one" if e.per_document else "joined with \\n\\n into one text",
        "windows": len(flat),
        "max_length_from": ("--max-length" if e.max_length else "the model's context" if load.context_is_a_limit(model.config)
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


def _sum_across_ranks(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks (float64 all-reduce); the values themselves in one process."""
    if not is_distributed():
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=distributed_state().device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# --------------------------------------------------------------------------------------------
# Masked LMs


def eval_masked_lm(model, tokenizer, cfg: Config) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    e = cfg.eval
    if tokenizer.mask_token_id is None:
        raise ConfigError("this masked LM's tokenizer has no mask token")
    context = load.context_length(model.config) or 512
    max_length = min(e.max_length or context, context)
    with main_process_first():
        docs, _ = tokenized.eval_documents(cfg.data, e.split)
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    body = max_length - 2
    blocks = [[tokenizer.cls_token_id] + ids[i : i + body] + [tokenizer.sep_token_id] for i in range(0, len(ids), body)]
    rank, world = rank_and_world()
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
    result = {"mlm_loss": loss, "mlm_accuracy": total_correct / total_masked, "perplexity": safe_exp(loss), "masked_tokens": total_masked}
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
