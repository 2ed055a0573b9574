"""The batching engine behind `llmcli serve`: one thread owns the model; HTTP handlers queue rows.

A row is one completion to produce (a prompt, times `n`) or one text to classify. The engine
takes the oldest queued row, waits at most `max_wait_ms` for others, and runs up to
`max_batch_size` rows that can share a forward in one batched `model.generate` (left-padded, as
`llmcli generate` batches, so a greedy row's tokens do not depend on its neighbours). Which rows
share a batch: every greedy row with every other greedy row (with the same repetition penalty);
sampled rows when their sampling settings are equal; a row with a `seed` only with the other rows
of its own request, so that the seed alone decides its sample.

Each row has its own `max_tokens`, stop strings and end: one object serves as generate's streamer
(it sees each step's tokens), its stopping criteria (a row is done at EOS, its stop string, its
length, or when its client went away; the batch ends when all are) and, when asked, a logits
processor that keeps the log-probabilities of the model's distribution (after the repetition
penalty, before temperature and top-k/p) for `logprobs`. Events go back to each request's
asyncio queue from this thread with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from llmcli import console
from llmcli.generate.generate import eos_ids, finish, pad_batch


@dataclass
class Sampling:
    temperature: float
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    seed: int | None

    def key(self, job_id: int) -> tuple:
        """Rows with equal keys can share a batch."""
        if self.seed is not None:
            return ("seeded", job_id)
        if self.temperature == 0:
            return ("greedy", self.repetition_penalty)
        return ("sampled", self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty)


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
    texts: list[str] = field(default_factory=list)  # classify: the inputs as given
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

    @property
    def key(self) -> tuple:
        return ("classify",) if self.job.kind == "classify" else self.job.sampling.key(self.job.id)


class Engine:
    def __init__(self, model, tokenizer, kind: str, max_batch_size: int, max_wait_ms: float, observe=None):
        self.model, self.tokenizer, self.kind = model, tokenizer, kind
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.observe = observe or (lambda **_: None)  # metrics: batch size, queue time
        self.eos = eos_ids(model, tokenizer) if kind == "causal-lm" else set()
        self.pending: list[Row] = []
        self.active = 0  # rows of the batch being computed that still take tokens
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

    def _next_batch(self) -> list[Row] | None:
        with self.cond:
            while not self.pending and not self.stopping:
                self.cond.wait()
            if self.stopping:
                return None
            deadline = self.pending[0].job.enqueued + self.max_wait
            while time.perf_counter() < deadline and len(self.pending) < self.max_batch_size and not self.stopping:
                self.cond.wait(timeout=max(0.0, deadline - time.perf_counter()))
            self.pending = [r for r in self.pending if not r.job.cancelled.is_set()]
            if not self.pending:
                return []
            key = self.pending[0].key
            batch = [r for r in self.pending if r.key == key][: self.max_batch_size]
            taken = {id(r) for r in batch}
            self.pending = [r for r in self.pending if id(r) not in taken]
            return batch

    def _loop(self) -> None:
        import torch

        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            now = time.perf_counter()
            self.observe(batch_size=len(batch), queue_s=[now - r.job.enqueued for r in batch])
            self.active = len(batch)
            try:
                with torch.inference_mode():
                    if batch[0].job.kind == "classify":
                        self._classify(batch)
                    else:
                        self._generate(batch)
            except Exception as err:  # the batch's requests get the error; the server goes on
                console.warn(f"a batch of {len(batch)} failed: {type(err).__name__}: {err}")
                for job in {id(r.job): r.job for r in batch}.values():
                    job.emit({"type": "error", "message": f"{type(err).__name__}: {err}"})
            self.active = 0

    def _classify(self, batch: list[Row]) -> None:
        from llmcli.evaluate.scoring import Scorer
        from llmcli.generate.generate import classify_batch
        from llmcli.models.heads import is_reward_model

        if is_reward_model(self.model.config):
            scores = Scorer(self.model, self.tokenizer, len(batch)).score([r.job.texts[r.index] for r in batch])
            results = [{"score": s} for s in scores]
        else:
            results = classify_batch(self.model, self.tokenizer, [r.prompt for r in batch], None)
        for row, res in zip(batch, results):
            row.job.emit({"type": "classified", "index": row.index, **res})

    def _generate(self, batch: list[Row]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        from llmcli.config import GenerationSection
        from llmcli.generate.generate import generate_kwargs

        s = batch[0].job.sampling
        g = GenerationSection(max_new_tokens=max(r.job.max_tokens for r in batch), temperature=s.temperature, top_k=s.top_k,
                              top_p=s.top_p, min_p=s.min_p, repetition_penalty=s.repetition_penalty)
        state = _BatchState(batch, self.tokenizer, self.eos, self)
        extra = {"streamer": state, "stopping_criteria": StoppingCriteriaList([state.stopper])}
        if any(r.job.logprobs is not None for r in batch):
            extra["logits_processor"] = LogitsProcessorList([state.recorder])
        if s.seed is not None:
            torch.manual_seed(s.seed)
        input_ids, mask = pad_batch(self.tokenizer, [r.prompt for r in batch], self.model.device, left=True)
        self.model.generate(input_ids=input_ids, attention_mask=mask, **generate_kwargs(self.tokenizer, g, **extra))
        for row in batch:
            if not row.done:
                state.close_row(row)


class _BatchState:
    """generate's streamer for one batch, with its stopping criteria and logprob recorder."""

    def __init__(self, rows: list[Row], tokenizer, eos: set[int], engine: Engine):
        from transformers import LogitsProcessor, StoppingCriteria

        self.rows, self.tokenizer, self.eos, self.engine = rows, tokenizer, eos, engine
        self.prompt_seen, self.last = False, None
        state = self

        class Stopper(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                import torch

                return torch.tensor([r.done for r in state.rows], device=input_ids.device)

        class Recorder(LogitsProcessor):
            def __call__(self, input_ids, scores):
                import torch

                state.last = torch.log_softmax(scores.float(), dim=-1)
                return scores

        self.stopper, self.recorder = Stopper(), Recorder()

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate passes the prompt first
            self.prompt_seen = True
            return
        tokens = value.tolist()
        for i, (row, token) in enumerate(zip(self.rows, tokens)):
            if row.done:
                continue
            self.engine.generated += 1
            if row.job.cancelled.is_set():
                row.done = True  # its client went away: the row stops taking compute
                self.engine.active -= 1
                continue
            if token in self.eos:
                row.ended_by_eos = True
                self.close_row(row)
                continue
            row.tokens.append(token)
            event = {"type": "token", "index": row.index, "token": token}
            if row.job.logprobs is not None and self.last is not None:
                lp = self.last[i]
                event["logprob"], event["piece"] = float(lp[token]), self.tokenizer.decode([token])
                if row.job.logprobs:
                    top = lp.topk(row.job.logprobs)
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
                self.close_row(row)
            return
        full = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        cuts = [full.find(s) for s in stops if s in full]
        if cuts:
            event["text"] = full[: min(cuts)][len(row.sent):]
            row.sent += event["text"]
            row.job.emit(event)
            self.close_row(row)
            return
        if len(row.tokens) >= row.job.max_tokens:
            event["text"] = full[len(row.sent):]
            row.sent = full
            row.job.emit(event)
            self.close_row(row)
            return
        safe = len(full.rstrip("\ufffd")) - (max(len(s) for s in stops) - 1 if stops else 0)
        event["text"] = full[len(row.sent): max(safe, len(row.sent))]
        row.sent += event["text"]
        row.job.emit(event)

    def close_row(self, row: Row) -> None:
        """The row's final text, token count and finish_reason, as `llmcli generate` computes them."""
        row.done = True
        self.engine.active -= 1
        seq = row.tokens + ([next(iter(self.eos))] if row.ended_by_eos else [])
        text, count, reason = finish(self.tokenizer, seq, self.eos, row.job)
        rest = text[len(row.sent):] if text.startswith(row.sent) else ""
        row.sent = text
        row.job.emit({"type": "end", "index": row.index, "text": rest, "completion": text, "completion_tokens": count,
                      "finish_reason": reason})

    def end(self) -> None:
        """generate's streamer protocol: called once the batch is done (rows end one by one, above)."""
