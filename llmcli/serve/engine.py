"""The engine behind `llmcli serve`: one thread owns the model; HTTP handlers queue rows.

A row is one completion to produce (a prompt, times `n`) or one text to classify. Completions run
in one batch that rows join between decode steps and leave when done (continuous batching, in
`decode.py`): a request that arrives while others are generating starts at the next step instead
of waiting for the whole batch to end. When the batch is empty, the first queued row waits at
most `max_wait_ms` for others to start with it. At most `max_batch_size` rows run at once.

Every row picks its own next token from its own logits, so rows with any sampling settings share
the batch: greedy rows take the argmax; sampled rows are warped with Transformers' own processors
(repetition penalty over the row's own tokens, then temperature, top-k, top-p, min-p, the order
`generate` uses); a request with a `seed` samples from its own generators (one per choice, seeded
from the seed and the choice's index), so the seed alone decides its text.

A row ends at EOS, at one of its stop strings, at its `max_tokens`, or when its client went away.
`logprobs` are those of the model's distribution after the repetition penalty, before temperature
and top-k/p. Events go back to each request's asyncio queue from this thread with
`loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from llmcli import console
from llmcli.generate.generate import eos_ids, finish


@dataclass
class Sampling:
    temperature: float
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    seed: int | None

    @property
    def warp_key(self) -> tuple:
        """Sampled rows with equal keys are warped together."""
        return (self.temperature, self.top_p, self.top_k, self.min_p)


@dataclass
class Job:
    """One HTTP request's rows. `emit(event)` is called from the engine thread."""

    kind: str  # "generate" or "classify"
    prompts: list[list[int]]
    emit: Callable[[dict[str, Any]], None]
    n: int = 1
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None
    sampling: Sampling | None = None
    stream: bool = True  # False: no per-token text is needed, only the end's (saves a decode per token)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=itertools.count().__next__)
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Row:
    job: Job
    index: int  # the choice index: prompt i, sample j -> i * n + j
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # text already emitted
    done: bool = False
    ended_by_eos: bool = False
    generator: Any = None  # a seeded request's torch.Generator for this choice


class Engine:
    def __init__(self, model, tokenizer, kind: str, max_batch_size: int, max_wait_ms: float, observe=None):
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.observe = observe or (lambda **_: None)  # metrics: batch size, queue time
        self.eos = eos_ids(model, tokenizer) if kind == "causal-lm" else set()
        self.pending: list[Row] = []
        self.active = 0  # rows of the running batch that still take tokens
        self.generated = 0  # tokens generated, including those of rows whose client went away
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="llmcli-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=5)

    def submit(self, job: Job) -> None:
        rows = [Row(job, i * job.n + j, ids) for i, ids in enumerate(job.prompts) for j in range(job.n)]
        with self.cond:
            self.pending.extend(rows)
            self.cond.notify()

    # ----------------------------------------------------------------------------------------

    def _admit(self, running: int, can_join: bool) -> list[Row] | None:
        """Queued rows to start now (None: stop). With nothing running, wait for the first row and
        up to `max_wait` for others; with rows running, take what is queued without waiting."""
        with self.cond:
            if running == 0:
                while not self.pending and not self.stopping:
                    self.cond.wait()
                deadline = self.pending[0].job.enqueued + self.max_wait if self.pending else 0
                while time.perf_counter() < deadline and len(self.pending) < self.max_batch_size and not self.stopping:
                    self.cond.wait(timeout=max(0.0, deadline - time.perf_counter()))
            if self.stopping:
                return None
            if not can_join:
                return []
            self.pending = [r for r in self.pending if not r.job.cancelled.is_set()]
            rows, self.pending = self.pending[: self.max_batch_size - running], self.pending[self.max_batch_size - running :]
        now = time.perf_counter()
        if rows:
            self.observe(queue_s=[now - r.job.enqueued for r in rows])
        return rows

    def _loop(self) -> None:
        import torch

        with torch.inference_mode():
            if self.kind == "causal-lm":
                while self._generate():
                    pass
                return
            while (rows := self._admit(0, True)) is not None:
                if rows:
                    self.observe(batch_size=len(rows))
                    try:
                        self._classify(rows)
                    except Exception as err:  # the batch's requests get the error; the server goes on
                        self._fail(rows, err)

    def _fail(self, rows: list[Row], err: Exception) -> None:
        console.warn(f"a batch of {len(rows)} failed: {type(err).__name__}: {err}")
        for job in {id(r.job): r.job for r in rows}.values():
            job.emit({"type": "error", "message": f"{type(err).__name__}: {err}"})

    def _classify(self, batch: list[Row]) -> None:
        from llmcli.generate.generate import classify_batch

        for row, res in zip(batch, classify_batch(self.model, self.tokenizer, [r.prompt for r in batch], None)):
            row.job.emit({"type": "classified", "index": row.index, **res})

    def _generate(self) -> bool:
        """Run the batch until it is empty; False once the engine stops. A failed step fails every
        row of the batch (their requests get the error) and the engine starts a new batch."""
        import torch

        from llmcli.serve.decode import RunningBatch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch, rows, tokens = RunningBatch(self.model, pad), [], None
        try:
            while True:
                keep = [i for i, r in enumerate(rows) if not r.done]
                batch.keep(keep)
                rows, tokens = [rows[i] for i in keep], tokens[keep] if keep else None
                new = self._admit(len(rows), batch.can_join)
                if new is None:
                    return False
                if not rows and not new:
                    continue
                for row in new:
                    row.generator = self.generator(row)
                running, rows = rows, rows + new  # a failing step fails the new rows too
                logits = [batch.step(tokens)] if running else []
                if new:
                    logits.append(batch.add([r.prompt for r in new]))
                self.observe(batch_size=len(rows))
                logits = torch.cat(logits) if len(logits) > 1 else logits[0]
                tokens, logprobs = self._choose(rows, logits)
                for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
                    self._take(row, token, logprobs[i] if logprobs is not None and row.job.logprobs is not None else None)
                self.active = sum(not r.done for r in rows)
                if not self.active:
                    return True
        except Exception as err:
            self._fail([r for r in rows if not r.done], err)
            self.active = 0
            return True

    def generator(self, row: Row):
        """A seeded request's generator for one choice: seeded from the seed and the choice's index."""
        import torch

        seed = row.job.sampling.seed
        return None if seed is None else torch.Generator(self.model.device).manual_seed((seed * 65537 + row.index) % 2**63)

    def _choose(self, rows: list[Row], logits):
        """Each row's next token (a tensor), and the log-probabilities when any row asked for them."""
        import torch
        from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        for i, row in enumerate(rows):
            penalty = row.job.sampling.repetition_penalty
            if penalty:  # as RepetitionPenaltyLogitsProcessor, over this row's own tokens only
                seen = torch.tensor(row.prompt + row.tokens, device=logits.device)
                score = logits[i, seen]
                logits[i, seen] = torch.where(score < 0, score * penalty, score / penalty)
        logprobs = torch.log_softmax(logits, dim=-1) if any(r.job.logprobs is not None for r in rows) else None
        tokens = logits.argmax(dim=-1)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            if row.job.sampling.temperature > 0:
                groups.setdefault(row.job.sampling.warp_key, []).append(i)
        for idx in groups.values():
            s = rows[idx[0]].job.sampling
            scores = logits[idx]
            warpers = [TemperatureLogitsWarper(s.temperature)] if s.temperature != 1 else []
            warpers += [TopKLogitsWarper(s.top_k)] if s.top_k else []
            warpers += [TopPLogitsWarper(s.top_p)] if s.top_p is not None and s.top_p < 1 else []
            warpers += [MinPLogitsWarper(s.min_p)] if s.min_p is not None else []
            for warp in warpers:
                scores = warp(None, scores)
            probs = torch.softmax(scores, dim=-1)
            shared = [j for j, i in enumerate(idx) if rows[i].generator is None]
            if shared:
                tokens[[idx[j] for j in shared]] = torch.multinomial(probs[shared], 1).view(-1)
            for j, i in enumerate(idx):
                if rows[i].generator is not None:
                    tokens[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
        return tokens, logprobs

    def _take(self, row: Row, token: int, logprobs) -> None:
        """Row's new token: emit its text (or end the row at EOS, a stop string or max_tokens)."""
        self.generated += 1
        if row.job.cancelled.is_set():
            row.done = True  # its client went away: the row leaves the batch
            return
        if token in self.eos:
            row.ended_by_eos = True
            self._close(row)
            return
        row.tokens.append(token)
        event = {"type": "token", "index": row.index, "token": token}
        if logprobs is not None:
            event["logprob"], event["piece"] = float(logprobs[token]), self.tokenizer.decode([token])
            if row.job.logprobs:
                top = logprobs.topk(row.job.logprobs)
                event["top_logprobs"] = {self.tokenizer.decode([t]): float(v) for v, t in zip(top.values.tolist(), top.indices.tolist())}
        self._text(row, event)

    def _text(self, row: Row, event: dict[str, Any]) -> None:
        """Emit the row's new text: held back while it may be the start of a stop string or ends in an
        incomplete UTF-8 character; cut, and the row ended, at a stop string or its max_tokens."""
        stops = row.job.stop
        if not row.job.stream and not stops:
            if "logprob" in event:  # the response lists every token's logprob
                row.job.emit({**event, "text": ""})
            if len(row.tokens) >= row.job.max_tokens:
                self._close(row)
            return
        full = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cuts = [full.find(s) for s in stops if s in full]
        if cuts:
            event["text"] = full[: min(cuts)][len(row.sent):]
            row.sent += event["text"]
            row.job.emit(event)
            self._close(row)
            return
        if len(row.tokens) >= row.job.max_tokens:
            event["text"] = full[len(row.sent):]
            row.sent = full
            row.job.emit(event)
            self._close(row)
            return
        safe = len(full.rstrip("\ufffd")) - (max(len(s) for s in stops) - 1 if stops else 0)
        event["text"] = full[len(row.sent): max(safe, len(row.sent))]
        row.sent += event["text"]
        row.job.emit(event)

    def _close(self, row: Row) -> None:
        """The row's final text, token count and finish_reason, as `llmcli generate` computes them."""
        row.done = True
        seq = row.tokens + ([next(iter(self.eos))] if row.ended_by_eos else [])
        text, count, reason = finish(self.tokenizer, seq, self.eos, row.job)
        rest = text[len(row.sent):] if text.startswith(row.sent) else ""
        row.sent = text
        row.job.emit({"type": "end", "index": row.index, "text": rest, "completion": text, "completion_tokens": count,
                      "finish_reason": reason})
