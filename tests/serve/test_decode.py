"""The running batch of `llmcli serve` (continuous batching): rows that join a batch mid-way, and rows that leave
it, get at every step the logits their own sequence gets alone, without a cache, for GPT-2 and the GRU."""

import json

import pytest
import torch

from llmcli.serve.decode import RunningBatch

PROMPTS = {"a": [5, 6, 7], "b": [8, 9, 10, 11, 12, 13, 14], "c": [3], "d": [20, 21], "e": [40, 41, 42, 43, 44]}
JOINS = {0: ["a"], 2: ["b", "c"], 3: ["d"], 6: ["e"]}  # step -> rows that start then
LEAVES = {4: ["a"], 5: ["c", "d"]}  # step -> rows that leave before it
STEPS = 9


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=2, n_embd=32, n_head=2, n_positions=64, initializer_range=0.2)).eval()


def gru():
    import llmcli.models

    llmcli.models.register()
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("gru", vocab_size=64, hidden_size=32, num_layers=2,
                                                                 initializer_range=0.5)).eval()


@pytest.mark.parametrize("build", [gpt2, gru])
def test_rows_joining_and_leaving_get_their_own_logits(build):
    model = build()
    batch, rows, tokens = RunningBatch(model, pad_id=0), [], None
    seen = {name: [] for name in PROMPTS}  # name -> [(the step's logits, the token chosen)]
    with torch.inference_mode():
        for step in range(STEPS):
            keep = [i for i, name in enumerate(rows) if name not in LEAVES.get(step, [])]
            batch.keep(keep)
            rows, tokens = [rows[i] for i in keep], tokens[keep] if keep else None
            logits = [batch.step(tokens)] if rows else []
            if step in JOINS:
                logits.append(batch.add([PROMPTS[name] for name in JOINS[step]]))
                rows += JOINS[step]
            logits = torch.cat(logits)
            tokens = logits.argmax(-1)
            for name, row_logits, token in zip(rows, logits, tokens.tolist()):
                seen[name].append((row_logits, token))
        assert rows == ["b", "e"] and batch.size == 2
        assert batch.mask.shape[1] == int(batch.lengths.max())  # the columns of the rows that left were dropped
        for name, steps in seen.items():
            ids = list(PROMPTS[name])
            for row_logits, token in steps:
                alone = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
                torch.testing.assert_close(row_logits, alone, rtol=1e-5, atol=1e-5)
                ids.append(token)
        counts = {name: len(steps) for name, steps in seen.items()}
        assert counts == {"a": 4, "b": 7, "c": 3, "d": 2, "e": 3}


def test_each_row_picks_its_token_by_its_own_settings():
    """Rows with different settings share a step: a repetition penalty counts only the row's own tokens (as
    Transformers' processor on that row alone), logprobs are taken after it, top-k is applied per row, and a seeded
    row draws the same tokens alone as beside other sampled rows."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from llmcli.serve.engine import Engine, Job, Row, Sampling

    engine = Engine(gpt2(), None, "causal-lm", max_batch_size=8, max_wait_ms=0)

    def row(sampling, prompt=(1, 2, 3, 2), logprobs=None, index=0):
        job = Job("generate", [list(prompt)], lambda e: None, sampling=sampling, logprobs=logprobs)
        return Row(job, index, list(prompt))

    torch.manual_seed(0)
    logits = torch.randn(4, 64)
    top = int(logits[0].argmax())
    rows = [row(Sampling(0, None, None, None, 1.5, None), prompt=(1, top, 3, top), logprobs=0), row(Sampling(0, None, None, None, None, None)),
            row(Sampling(0.7, None, 1, None, None, None)), row(Sampling(1.0, 0.9, None, None, 1.2, None), prompt=(5, 6))]
    tokens, logprobs = engine._choose(rows, logits.clone())
    penalized = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[1, top, 3, top]]), logits[:1].clone())[0]
    assert int(tokens[0]) == int(penalized.argmax()) != top
    torch.testing.assert_close(logprobs[0], torch.log_softmax(penalized, -1), rtol=1e-6, atol=1e-6)
    assert int(tokens[1]) == int(logits[1].argmax()) and int(tokens[2]) == int(logits[2].argmax())  # top-k 1 is greedy

    def draws(with_others: bool) -> list[int]:
        seeded = [row(Sampling(1.0, None, None, None, None, 7), index=i) for i in range(2)]
        for r in seeded:
            r.generator = engine.generator(r)
        others = [row(Sampling(1.0, None, None, None, None, None)) for _ in range(3)] if with_others else []
        out = []
        for step in range(20):
            mine = torch.randn(2, 64, generator=torch.Generator().manual_seed(step))
            step_logits = torch.cat([torch.randn(len(others), 64), mine])
            out += engine._choose(others + seeded, step_logits)[0][-2:].tolist()
        return out

    alone = draws(False)
    assert draws(True) == alone and len(set(alone)) > 5


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on():
    """A forward that raises: every request of the batch gets an error event, and the next request is served."""
    import functools
    import threading

    from llmcli.serve.engine import Engine, Job, Sampling

    class Tok:  # what the engine reads of a tokenizer for a non-streamed request without stop strings
        pad_token_id, eos_token_id = 0, None

        def decode(self, ids, **kwargs):
            return " ".join(map(str, ids))

    model = gpt2()
    broken = {"on": True}
    forward = model.forward

    @functools.wraps(forward)
    def flaky(*args, **kwargs):
        if broken["on"]:
            raise RuntimeError("out of memory (a test's failure)")
        return forward(*args, **kwargs)

    model.forward = flaky
    engine = Engine(model, Tok(), "causal-lm", max_batch_size=8, max_wait_ms=50)
    engine.start()
    try:
        def run(prompts) -> list[dict]:
            events, done = [], threading.Event()

            def emit(event):
                events.append(event)
                if event["type"] == "error" or sum(e["type"] == "end" for e in events) == len(prompts):
                    done.set()

            engine.submit(Job("generate", prompts, emit, max_tokens=3, sampling=Sampling(0, None, None, None, None, None), stream=False))
            assert done.wait(60)
            return events

        failed = [run([[1, 2, 3]]), run([[4, 5], [6]])]
        assert [[e["type"] for e in events] for events in failed] == [["error"], ["error"]]
        assert "out of memory" in failed[0][0]["message"]
        broken["on"] = False
        served = run([[1, 2, 3]])
        assert [e["type"] for e in served] == ["end"] and served[0]["completion_tokens"] == 3
    finally:
        engine.stop()


def test_torch_threads_spin_briefly_unless_the_environment_chooses():
    """`llmcli serve` shortens libgomp's spin before torch loads (BENCHMARKS.md: serving), and a user's setting wins."""
    import subprocess
    import sys

    code = """
import json, os, sys
from llmcli.serve.serve import _threads_spin_briefly
seen = []
for env in ({}, {"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
    for key in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        os.environ.pop(key, None)
    os.environ.update(env)
    _threads_spin_briefly()
    seen.append(os.environ.get("GOMP_SPINCOUNT"))
assert "torch" not in sys.modules
print(json.dumps(seen))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["20000", "5", None]
