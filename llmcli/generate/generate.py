"""`llmcli generate`: completions from a causal LM, or labels from a classifier, as a Unix filter.

    llmcli generate --model runs/shakespeare --prompt "ROMEO:" --max-new-tokens 80
    cat prompts.txt | llmcli generate --model runs/shakespeare --temperature 0 > completions.txt
    llmcli generate --model runs/shakespeare --input prompts.jsonl --input-format jsonl --format jsonl
    cat reviews.txt | llmcli generate --model runs/sst2 --format jsonl       # classifier: labels

Output line N answers input prompt N. Prompts are batched (left-padded, sorted by length inside a
window to cut padding, KV cache on) and each window's results are written as soon as it finishes; a
window also closes early when piped input pauses, so a slow stream is answered as it comes.
An empty prompt starts from BOS. Data goes to stdout (or --output); diagnostics to stderr.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import Any, Iterable, Iterator, TextIO

from llmcli import console
from llmcli.config import Config, GenerationSection
from llmcli.errors import ConfigError
from llmcli.generate.prompts import PAUSE, Prompt, read_prompts
from llmcli.models import load
from llmcli.models.heads import is_reward_model

WINDOW_BATCHES = 4  # sort by length within this many batches: less padding, output still streams
NO_START = "empty prompt, and the tokenizer has no BOS or EOS token to start from"


def run(cfg: Config, prompts: list[str] | None = None, input_path: str | None = None, input_format: str = "text",
        output_format: str = "text", output_path: str | None = None, checkpoint: str | None = None,
        device: str | None = None, dtype: str | None = None) -> int:
    """Generate (or classify) every prompt; returns the number of output lines (one per prompt)."""
    if not cfg.model.model_name_or_path:
        raise ConfigError("generate needs a model: pass --model (hub id, model dir or llmcli run dir)")
    path = load.resolve_model_path(cfg.model.model_name_or_path, checkpoint)
    items = read_prompts(prompts, input_path, input_format)
    first = _first_prompts(items)  # blocks until input arrives; enough to choose streaming
    if not first:
        console.warn("no prompts (the input held only blank lines)")
        return 0
    model, tokenizer, kind = load.load_for_inference(path, cfg.model, device, dtype)
    if kind == "masked-lm":
        raise ConfigError(f"{path} is a masked LM; generate needs a causal LM (text) or a classifier (labels)")
    g = cfg.generation
    _check_generation(g)

    out: TextIO = open(output_path, "w", encoding="utf-8") if output_path else sys.stdout
    try:
        if kind == "causal-lm" and len(first) == 1 and _should_stream(output_path, output_format, g):
            ids = _encode(tokenizer, first[0].text)
            if ids is not None:
                _stream_one(model, tokenizer, ids, g)
                return 1
        step = classify_batch if kind == "classification" else _generate_batch
        return _run_batches(model, tokenizer, itertools.chain(first, items), g, step, out, output_format, kind)
    except BrokenPipeError:
        # `| head -1` closed the pipe: stop quietly (exit 0), and keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        if out is not sys.stdout:
            out.close()


def _first_prompts(items: Iterator) -> list:
    """The first two prompts, or fewer if the input ends or pauses first; one prompt alone means
    the input held exactly one (a pause after it leaves a PAUSE at the end)."""
    first: list = []
    for item in items:
        if item is PAUSE and not first:
            continue
        first.append(item)
        if item is PAUSE or len(first) == 2:
            break
    return first


# --------------------------------------------------------------------------------------------
# Batching


def _check_generation(g: GenerationSection) -> None:
    if g.do_sample and g.temperature == 0:
        raise ConfigError("generation.temperature=0 means greedy decoding; it cannot be combined with do_sample=true")


def _sampling(g: GenerationSection) -> bool:
    return g.do_sample if g.do_sample is not None else g.temperature > 0


def _run_batches(model, tokenizer, items: Iterable[Prompt], g: GenerationSection, step, out: TextIO, fmt: str, kind: str) -> int:
    """Answer prompts window by window (a window is WINDOW_BATCHES batches, sorted by length inside
    it, closed early when the input pauses); each window's lines are written, in input order, as soon
    as it is done. Returns the number of lines written."""
    import torch

    if g.seed is not None:
        torch.manual_seed(g.seed)
    limit = _prompt_limit(model, g, kind)
    window_size = g.batch_size * WINDOW_BATCHES
    answered = cut = unanswerable = 0
    items = iter(items)
    with console.progress("generate") as bar:
        while window := _next_window(items, window_size):
            encoded = [_encode(tokenizer, p.text) for p in window]
            results: dict[int, dict[str, Any]] = {i: {"error": NO_START} for i, ids in enumerate(encoded) if ids is None}
            unanswerable += len(results)
            fitted = [None if ids is None else (ids[-limit:], len(ids) > limit) if kind == "causal-lm"
                      else classifier_ids(model, tokenizer, ids, limit) for ids in encoded]
            encoded = [f if f is None else f[0] for f in fitted]
            cut += sum(1 for f in fitted if f is not None and f[1])
            order = sorted((i for i in range(len(window)) if encoded[i] is not None), key=lambda i: len(encoded[i]))
            bar.advance(len(results))
            for b in range(0, len(order), g.batch_size):
                batch = order[b : b + g.batch_size]
                for i, res in zip(batch, step(model, tokenizer, [encoded[i] for i in batch], g)):
                    results[i] = res
                bar.advance(len(batch))
            out.write("".join(_format(window[i], results[i], fmt, kind) + "\n" for i in range(len(window))))
            out.flush()
            answered += len(window)
    if unanswerable:
        console.warn(f"{unanswerable} empty prompt(s) could not be answered (the tokenizer has no BOS or EOS token to start "
                     "from): their lines are empty, or hold an 'error' field in JSONL")
    if cut:
        what = "the model's context less max_new_tokens" if kind == "causal-lm" else "the model's context"
        left = kind == "causal-lm" or is_reward_model(model.config)
        console.warn(f"{cut} prompt(s) longer than {limit} tokens ({what}) were cut from the {'left' if left else 'right'}")
    return answered


def _next_window(items: Iterator, size: int) -> list[Prompt]:
    """Up to `size` prompts; fewer when the input ends, or pauses after at least one prompt."""
    window: list[Prompt] = []
    for item in items:
        if item is PAUSE:
            if window:
                break
            continue
        window.append(item)
        if len(window) == size:
            break
    return window


def _encode(tokenizer, text: str) -> list[int] | None:
    """A prompt's token ids; an empty prompt is BOS (else EOS) as with GPT-2, None if the tokenizer has neither."""
    ids = tokenizer(text)["input_ids"]
    if ids:
        return ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return None if start is None else [start]


def _prompt_limit(model, g: GenerationSection, kind: str) -> int:
    if not load.context_is_a_limit(model.config):
        return sys.maxsize  # a recurrent model reads prompts of any length
    context = load.context_length(model.config) or 1024
    if kind == "classification":
        return context
    if g.max_new_tokens >= context:
        raise ConfigError(f"generation.max_new_tokens={g.max_new_tokens} leaves no room for a prompt in the model's {context}-token context")
    return context - g.max_new_tokens


def pad_batch(tokenizer, batch: list[list[int]], device, left: bool):
    """Pad to the longest: left for generation (new tokens follow the prompt), right for a
    classifier's single forward pass (absolute position embeddings must start at 0)."""
    import torch

    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fill = [[pad] * (width - len(ids)) for ids in batch]
    zeros = [[0] * (width - len(ids)) for ids in batch]
    ids = [f + x if left else x + f for f, x in zip(fill, batch)]
    mask = [z + [1] * len(x) if left else [1] * len(x) + z for z, x in zip(zeros, batch)]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def _generate_batch(model, tokenizer, batch: list[list[int]], g: GenerationSection) -> list[dict[str, Any]]:
    import torch

    input_ids, mask = pad_batch(tokenizer, batch, model.device, left=True)
    kwargs = generate_kwargs(tokenizer, g, mask, num_return_sequences=g.num_return_sequences)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    new_tokens = output[:, input_ids.shape[1] :].tolist()
    eos = eos_ids(model, tokenizer)
    results = []
    n = g.num_return_sequences
    for i, prompt_ids in enumerate(batch):
        completions, counts, reasons = [], [], []
        for seq in new_tokens[i * n : (i + 1) * n]:
            text, count, reason = finish(tokenizer, seq, eos, g)
            completions.append(text)
            counts.append(count)
            reasons.append(reason)
        results.append({"completion": completions, "completion_tokens": counts, "finish_reason": reasons, "prompt_tokens": len(prompt_ids)})
    return results


def generate_kwargs(tokenizer, g: GenerationSection, mask, **extra) -> dict[str, Any]:
    """`model.generate` arguments for a batch left-padded by `pad_batch` (`mask`: its attention mask)."""
    kwargs: dict[str, Any] = dict(max_new_tokens=g.max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True, **extra)
    if _sampling(g):
        kwargs.update(do_sample=True, temperature=g.temperature or 1.0, top_k=g.top_k or 0, top_p=g.top_p or 1.0,
                      min_p=g.min_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None, min_p=None)
    if g.repetition_penalty:
        kwargs["logits_processor"] = [OwnTokensRepetitionPenalty(g.repetition_penalty, mask, extra.get("num_return_sequences", 1))]
    if g.stop:
        kwargs.update(stop_strings=g.stop, tokenizer=tokenizer)
    return kwargs


class OwnTokensRepetitionPenalty:
    """Transformers' `RepetitionPenaltyLogitsProcessor` over each row's own tokens. Transformers' own
    counts a left-padded row's pads too, and GPT-2's pad is its EOS: a row's text would then depend on
    the batch it ran in. `mask` is the prompts' attention mask; each row repeats `copies` times."""

    def __init__(self, penalty: float, mask, copies: int = 1):
        self.penalty = penalty
        self.pads = (mask == 0).sum(dim=1).repeat_interleave(copies)

    def __call__(self, input_ids, scores):
        import torch

        own = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] >= self.pads[:, None]
        seen = torch.zeros_like(scores).scatter_reduce_(1, input_ids, own.to(scores.dtype), reduce="amax")
        penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen > 0, penalized, scores)


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a completion: the generation config's (one or several), else the tokenizer's."""
    value = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    if value is None:
        return set()
    return set(value) if isinstance(value, (list, tuple, set)) else {value}


def finish(tokenizer, seq: list[int], eos: set[int], g: GenerationSection) -> tuple[str, int, str]:
    """Cut at EOS or the first stop string; (text, tokens generated, finish_reason)."""
    reason = "length"
    for pos, tok in enumerate(seq):
        if tok in eos:
            seq, reason = seq[:pos], "stop"
            break
    text = tokenizer.decode(seq, skip_special_tokens=True)
    cuts = [text.find(s) for s in g.stop if s in text]
    if cuts:
        text, reason = text[: min(cuts)], "stop"
        return text, len(tokenizer(text, add_special_tokens=False)["input_ids"]), reason
    return text, len(seq), reason


def classifier_ids(model, tokenizer, ids: list[int], limit: int) -> tuple[list[int], bool]:
    """What a sequence classifier reads of a prompt, and whether it was cut to `limit` tokens. A classifier reads
    the start. A reward model reads the prompt and EOS, as TRL's RewardTrainer trained it (and as `Scorer` scores
    texts), and keeps the end when it must cut: what is judged is the completion."""
    if not is_reward_model(model.config):
        return ids[:limit], len(ids) > limit
    eos = tokenizer.eos_token_id
    ids = ids + [eos] if eos is not None and ids[-1] != eos else ids
    return ids[-limit:], len(ids) > limit


def classify_batch(model, tokenizer, batch: list[list[int]], g: GenerationSection | None) -> list[dict[str, Any]]:
    """Each row's label, its probability and every class's; a reward model's row is its reward (the logit).
    Rows come from `classifier_ids`."""
    import torch

    input_ids, mask = pad_batch(tokenizer, batch, model.device, left=False)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
    if is_reward_model(model.config):
        return [{"score": float(value), "prompt_tokens": len(ids)} for ids, value in zip(batch, logits[:, 0].tolist())]
    probs = torch.softmax(logits, dim=-1).tolist()
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    results = []
    for ids, row in zip(batch, probs):
        best = max(range(len(row)), key=row.__getitem__)
        results.append({"label": id2label.get(best, str(best)), "score": row[best],
                        "scores": {id2label.get(j, str(j)): p for j, p in enumerate(row)}, "prompt_tokens": len(ids)})
    return results


def _format(item: Prompt, res: dict[str, Any], fmt: str, kind: str) -> str:
    if "error" in res:
        return "" if fmt == "text" else json.dumps({**item.extra, "prompt": item.text, "error": res["error"]}, ensure_ascii=False)
    if kind == "classification":
        if fmt == "text":
            return f"{res['label']}\t{res['score']:.4f}" if "label" in res else f"{res['score']:.4f}"
        return json.dumps({**item.extra, "prompt": item.text, **res}, ensure_ascii=False)
    single = len(res["completion"]) == 1
    if fmt == "text":
        return "\t".join(_escape(c) for c in res["completion"])
    record = {**item.extra, "prompt": item.text}
    for key in ("completion", "prompt_tokens", "completion_tokens", "finish_reason"):
        value = res[key]
        record[key] = value[0] if single and isinstance(value, list) else value
    return json.dumps(record, ensure_ascii=False)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


# --------------------------------------------------------------------------------------------
# Streaming one prompt to a terminal


def _should_stream(output_path, fmt: str, g: GenerationSection) -> bool:
    return output_path is None and fmt == "text" and g.num_return_sequences == 1 and sys.stdout.isatty()


def _stream_one(model, tokenizer, ids: list[int], g: GenerationSection) -> None:
    """Print the completion token by token, holding back text that could start a stop string."""
    import torch
    from transformers import TextStreamer

    hold = max((len(s) for s in g.stop), default=1) - 1

    class StopAwareStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.buffer, self.stopped = "", False

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if self.stopped:
                return
            self.buffer += text
            cuts = [self.buffer.find(s) for s in g.stop if s in self.buffer]
            if cuts:
                sys.stdout.write(self.buffer[: min(cuts)])
                self.buffer, self.stopped = "", True
            elif stream_end or len(self.buffer) > hold:
                keep = 0 if stream_end else hold
                sys.stdout.write(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep :]
            sys.stdout.flush()

    if g.seed is not None:
        torch.manual_seed(g.seed)
    limit = _prompt_limit(model, g, "causal-lm")
    if len(ids) > limit:
        console.warn(f"1 prompt(s) longer than {limit} tokens were cut from the left")
    input_ids, mask = pad_batch(tokenizer, [ids[-limit:]], model.device, left=True)
    kwargs = generate_kwargs(tokenizer, g, mask, streamer=StopAwareStreamer())
    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    sys.stdout.write("\n")
    sys.stdout.flush()
