"""`llmcli serve` driven by the official `openai` client: the server runs as a subprocess on a free loopback port
(`--port 0`; the port is read from its startup line), on tiny local models."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

from conftest import FIXTURES, ROOT, TINY_GRU, sets

openai = pytest.importorskip("openai")

PROMPTS = [f"{who}: {what}" for who in ("ROMEO", "JULIET", "First Citizen", "KING") for what in
           ("O", "What say you", "the king is dead and the", "I will", "my lord,", "Good morrow", "A", "Then let us go to the")]
PROMPTS = [*PROMPTS, *(p + " now" for p in PROMPTS)]  # 64 prompts of 2 to 9 tokens
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@contextmanager
def server(model, *args, env=None):
    """`llmcli serve` on a free port; yields (base_url, process, stderr lines so far)."""
    proc = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", "--model", str(model), "--port", "0", *map(str, args)],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    lines, ready = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if " on http://" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(120)
    found = [re.search(r"on (http://[\d.]+:\d+)/v1", line) for line in lines]
    url = next((m.group(1).replace("0.0.0.0", "127.0.0.1") for m in found if m), None)
    assert url, "".join(lines)
    try:
        yield url, proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def client(url, key="none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def metric(url, name, headers=None):
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith(name)}


def test_completions_batched_streamed_and_equal_to_generate(cli, gpt2_run, tmp_path):
    """64 concurrent greedy requests, which join a batch where a long stream is already generating, get exactly the
    tokens each gets alone, and `llmcli generate --temperature 0`'s text and counts; so does the long stream, and a
    seeded sampled request among them gets the text it gets alone. A stream reassembles to the same text with its
    id on the first chunk, finish_reason on the last and the same usage; chosen-token logprobs equal the model's
    log-softmax from an independent forward."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with server(gpt2_run, "--max-wait-ms", 300) as (url, proc, _):
        c = client(url)
        assert [m.id for m in c.models.list().data] == [gpt2_run.name]
        alone = [c.completions.create(model=gpt2_run.name, prompt=p, max_tokens=12, temperature=0) for p in PROMPTS]
        long_alone = c.completions.create(model=gpt2_run.name, prompt=PROMPTS[0], max_tokens=100, temperature=0)
        seeded_alone = c.completions.create(model=gpt2_run.name, prompt="ROMEO:", max_tokens=8, temperature=1.0, seed=7, n=2)

        async def together():
            ac = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
            long = await ac.completions.create(model=gpt2_run.name, prompt=PROMPTS[0], max_tokens=100, temperature=0, stream=True)
            first = await long.__anext__()  # the long row is generating: the others join its batch

            async def rest():
                return [first, *[chunk async for chunk in long]]

            return await asyncio.gather(rest(), ac.completions.create(model=gpt2_run.name, prompt="ROMEO:", max_tokens=8,
                                                                      temperature=1.0, seed=7, n=2),
                                        *(ac.completions.create(model=gpt2_run.name, prompt=p, max_tokens=12, temperature=0)
                                          for p in PROMPTS))

        long, seeded, *batched = asyncio.run(together())
        assert [r.choices[0].text for r in batched] == [r.choices[0].text for r in alone]
        assert [r.usage.model_dump() for r in batched] == [r.usage.model_dump() for r in alone]
        assert "".join(chunk.choices[0].text for chunk in long) == long_alone.choices[0].text
        assert long_alone.usage.completion_tokens > 12  # it was still generating when the 64 ended
        assert [ch.text for ch in seeded.choices] == [ch.text for ch in seeded_alone.choices] and len(seeded.choices) == 2
        assert seeded.choices[0].text != seeded.choices[1].text  # each choice has its own generator
        sizes = metric(url, "llmcli_batch_size_bucket")
        assert sizes['llmcli_batch_size_bucket{le="16.0"}'] < sizes['llmcli_batch_size_bucket{le="64.0"}']  # a batch of > 16 rows ran

        stream = list(c.completions.create(model=gpt2_run.name, prompt=PROMPTS[5], max_tokens=12, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert stream[0].id.startswith("cmpl-") and len({s.id for s in stream}) == 1
        assert "".join(s.choices[0].text for s in stream if s.choices) == alone[5].choices[0].text
        assert [s.choices[0].finish_reason for s in stream if s.choices][-1] == alone[5].choices[0].finish_reason
        assert stream[-1].choices == [] and stream[-1].usage.model_dump() == alone[5].usage.model_dump()

        with pytest.raises(openai.BadRequestError, match="has no chat template.*/v1/completions serves it"):  # a base model
            c.chat.completions.create(model=gpt2_run.name, messages=[{"role": "user", "content": "hi"}])
        scored = c.completions.create(model=gpt2_run.name, prompt=PROMPTS[3], max_tokens=6, temperature=0, logprobs=2)
        echo = c.completions.create(model=gpt2_run.name, prompt=PROMPTS[3], max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPTS[3] + scored.choices[0].text
    assert proc.returncode is not None

    inputs = tmp_path / "prompts.txt"
    inputs.write_text("\n".join(PROMPTS) + "\n")
    offline = read_jsonl_text(cli("generate", "--model", gpt2_run, "--input", inputs, "--temperature", "0", "--max-new-tokens", "12",
                                  "--format", "jsonl").stdout)
    assert [o["completion"] for o in offline] == [r.choices[0].text for r in alone]
    assert [o["completion_tokens"] for o in offline] == [r.usage.completion_tokens for r in alone]
    assert [o["prompt_tokens"] for o in offline] == [r.usage.prompt_tokens for r in alone]

    tok, model = AutoTokenizer.from_pretrained(gpt2_run), AutoModelForCausalLM.from_pretrained(gpt2_run).eval()
    ids, ref, pieces = tok(PROMPTS[3])["input_ids"], [], []
    with torch.no_grad():  # greedy decoding by hand: the chosen token is the argmax, its logprob the log-softmax there
        for _ in range(6):
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            ids.append(int(logprobs.argmax()))
            ref.append(float(logprobs[ids[-1]]))
            pieces.append(tok.decode([ids[-1]]))
    lp = scored.choices[0].logprobs
    assert lp.tokens == pieces and lp.token_logprobs == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(lp.token_logprobs[i], rel=1e-6) for i, top in enumerate(lp.top_logprobs))
    assert "".join(lp.tokens) == scored.choices[0].text


def read_jsonl_text(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_chat_auth_limits_and_bad_requests_are_openai_errors(gpt2_run):
    """With an API key every request needs it (401); chat works with a configured template and is the completion
    of the rendered prompt; each bad request is a 4xx OpenAI error object and the server keeps serving."""
    key = "s3cret"
    with server(gpt2_run, "--host", "0.0.0.0", *sets(f"serve.chat_template={TEMPLATE}", "serve.max_request_bytes=2000", "serve.max_tokens=50"),
                env={"LLMCLI_API_KEY": key}) as (url, proc, lines):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert httpx.get(f"{url}/health").status_code == 401 and "(API key required)" in "".join(lines)
        c = client(url, key)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is there?"}]
        chat = c.chat.completions.create(model=gpt2_run.name, messages=messages, max_tokens=8, temperature=0)
        rendered = "system: Be brief.\nuser: Who is there?\nassistant:"
        plain = c.completions.create(model=gpt2_run.name, prompt=rendered, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content == plain.choices[0].text and chat.choices[0].message.role == "assistant"
        assert chat.usage.model_dump() == plain.usage.model_dump()
        chunks = list(c.chat.completions.create(model=gpt2_run.name, messages=messages, max_tokens=8, temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].id.startswith("chatcmpl-")
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == plain.choices[0].text
        assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason

        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        bad = [
            (b'{"model": "x", "prompt": ', 400, None),
            (json.dumps({"model": gpt2_run.name, "prompt": "a", "max_tokens": 0}), 400, "max_tokens"),
            (json.dumps({"model": gpt2_run.name, "prompt": "a", "max_tokens": 51}), 400, "max_tokens"),
            (json.dumps({"model": gpt2_run.name, "prompt": "a", "temperature": "hot"}), 400, "temperature"),
            (json.dumps({"model": gpt2_run.name, "prompt": "the " * 90, "max_tokens": 50}), 400, "prompt"),
            (json.dumps({"model": "gpt-4", "prompt": "a"}), 404, "model"),
            (json.dumps({"model": gpt2_run.name, "prompt": "a" * 3000}), 413, None),
            (json.dumps({"model": gpt2_run.name, "input": "a"}), 400, "prompt"),
        ]
        for body, status, param in bad:
            r = httpx.post(f"{url}/v1/completions", content=body, headers=auth)
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"], r.text
        too_long = httpx.post(f"{url}/v1/completions", headers=auth,
                              json={"model": gpt2_run.name, "prompt": "the " * 90, "max_tokens": 50}).json()["error"]
        assert too_long["code"] == "context_length_exceeded" and "maximum context length is 128 tokens" in too_long["message"]
        r = httpx.post(f"{url}/v1/classify", headers=auth, json={"model": gpt2_run.name, "input": "a"})
        assert r.status_code == 400 and "use /v1/completions" in r.json()["error"]["message"]
        assert c.completions.create(model=gpt2_run.name, prompt="ROMEO:", max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(f"{url}/health", headers=auth).json()["status"] == "ok"
        assert proc.poll() is None
        assert not any("without an API key" in line for line in lines)  # every interface, with a key: no warning


def test_classify_equals_generate_labels_on_torch_and_onnx_runtime(cli, classifier_run, tmp_path):
    """/v1/classify gives `llmcli generate`'s labels and probabilities; a copy exported by `llmcli export` and served
    with --runtime onnx gives the same labels and probabilities as served by torch."""
    import shutil

    pytest.importorskip("onnxruntime")
    run = shutil.copytree(classifier_run, tmp_path / "clf")
    cli("export", "--model", run)
    texts = [json.loads(line)["text"] for line in (FIXTURES / "sentiment_dev.jsonl").read_text().splitlines()]
    results = {}
    for runtime in ("torch", "onnx"):
        with server(run, "--runtime", runtime) as (url, _, lines):
            r = httpx.post(f"{url}/v1/classify", json={"model": run.name, "input": texts})
            assert r.status_code == 200 and any("ONNX Runtime" in line for line in lines) == (runtime == "onnx")
            results[runtime] = r.json()
            if runtime == "torch":
                single = httpx.post(f"{url}/v1/classify", json={"model": run.name, "input": texts[0]}).json()
                with pytest.raises(openai.BadRequestError, match="use /v1/classify"):
                    client(url).completions.create(model=run.name, prompt="hi")
    data = results["torch"]["data"]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    offline = read_jsonl_text(cli("generate", "--model", classifier_run, "--input", tmp_path / "texts.txt", "--format", "jsonl").stdout)
    assert [d["index"] for d in data] == list(range(len(texts))) and len(texts) == 40
    assert [d["label"] for d in data] == [o["label"] for o in offline]
    for d, o in zip(data, offline):
        assert d["score"] == pytest.approx(o["score"], rel=1e-5) and d["scores"] == pytest.approx(o["scores"], rel=1e-5)
    assert single["data"][0]["label"] == data[0]["label"]
    assert results["torch"]["usage"]["prompt_tokens"] == sum(o["prompt_tokens"] for o in offline)
    assert [d["label"] for d in results["onnx"]["data"]] == [d["label"] for d in data]
    for a, b in zip(data, results["onnx"]["data"]):
        assert b["scores"] == pytest.approx(a["scores"], abs=1e-5)


def test_a_client_that_leaves_frees_its_rows_and_sigterm_finishes_requests_in_flight(cli, tmp_path):
    """On the GRU (no context limit, so long completions): a stream closed after two chunks stops its row (the engine
    generated far fewer than its max_tokens); SIGTERM with three streams in flight lets them finish, then exit 0."""
    run = tmp_path / "gru"
    cli("pretrain", *sets(*TINY_GRU, "training.max_steps=10"), "-o", run)
    with server(run, "--max-wait-ms", 50) as (url, proc, lines):
        c = client(url)
        stream = c.completions.create(model="gru", prompt="ROMEO:", max_tokens=3000, temperature=0, stream=True)
        for _, _chunk in zip(range(2), stream):
            pass
        stream.close()
        deadline = time.time() + 60
        while metric(url, "llmcli_active_rows").get("llmcli_active_rows", 1) != 0 and time.time() < deadline:
            time.sleep(0.05)
        assert metric(url, "llmcli_active_rows")["llmcli_active_rows"] == 0
        assert metric(url, "llmcli_generated_tokens")["llmcli_generated_tokens"] < 1500
        assert metric(url, "llmcli_requests_cancelled_total")["llmcli_requests_cancelled_total"] == 1
        assert c.completions.create(model="gru", prompt="ROMEO:", max_tokens=4, temperature=0).usage.completion_tokens == 4

        results, started = [None] * 3, threading.Barrier(4)

        def long_stream(i):
            parts = c.completions.create(model="gru", prompt="JULIET:", max_tokens=400, temperature=0, stream=True)
            got = []
            for n, part in enumerate(parts):
                got.append(part)
                if n == 0:
                    started.wait()
            results[i] = got

        threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        started.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=60) == 0, "".join(lines)
    for got in results:
        assert got is not None and got[-1].choices[0].finish_reason == "length"
        assert sum(1 for part in got if part.choices and part.choices[0].text) >= 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health")
    assert "llmcli serve: stopped" in "".join(lines)


def test_startup_errors_are_one_line_with_exit_codes(cli, gpt2_run, tmp_path):
    missing = cli("serve", "--model", tmp_path / "nope", expect=None)
    assert missing.exit_code == 2 and missing.stderr == f"error: model path not found: {tmp_path / 'nope'}\n"
    assert cli("serve", "--model", gpt2_run, "--set", "serve.port=70000", expect=2).stderr.startswith("error: ")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        busy = cli("serve", "--model", gpt2_run, "--port", port, expect=1)
    assert busy.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    # every interface without a key: one warning (with a key, none: the chat test's server)
    with server(gpt2_run, "--host", "0.0.0.0") as (url, _, lines):
        assert client(url).models.list().data[0].id == gpt2_run.name
        assert sum("without an API key" in line for line in lines) == 1


def test_a_reward_model_is_scored_by_its_reward_in_serve_and_generate(cli, reward_run, tmp_path):
    """A reward model (one output) gets its reward, not a label: the logit of the text and EOS, as TRL's
    RewardTrainer trained it, from /v1/classify, from `llmcli generate` (JSONL and text) and from eval's `Scorer`,
    each equal to an independent forward of that one text; a text longer than the context keeps its end."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmcli.evaluate.scoring import Scorer

    run = reward_run
    tok, model = AutoTokenizer.from_pretrained(run), AutoModelForSequenceClassification.from_pretrained(run).eval()
    texts = [json.loads(line)["text"] for line in (FIXTURES / "sentiment_dev.jsonl").read_text().splitlines()][:7]
    texts.append(" ".join([texts[0], *PROMPTS, texts[1]]))  # > 128 tokens: cut from the left, its end read
    eos = tok.eos_token_id
    with torch.no_grad():
        ids = [tok(t)["input_ids"] for t in texts]
        reads = [(i + [eos])[-128:] for i in ids]
        reference = [float(model(torch.tensor([r])).logits[0, 0]) for r in reads]
        its_start = float(model(torch.tensor([ids[-1][:127] + [eos]])).logits[0, 0])
    assert len(ids[-1]) > 128 and reference[-1] != pytest.approx(its_start, rel=1e-3)  # which end is read shows

    inputs = tmp_path / "texts.txt"
    inputs.write_text("\n".join(texts) + "\n")
    result = cli("generate", "--model", run, "--input", inputs, "--format", "jsonl")
    offline = read_jsonl_text(result.stdout)
    assert [set(o) for o in offline] == [{"prompt", "score", "prompt_tokens"}] * len(texts)
    assert [o["score"] for o in offline] == pytest.approx(reference, rel=1e-5)
    assert [o["prompt_tokens"] for o in offline] == [len(r) for r in reads]
    assert "1 prompt(s) longer than 128 tokens (the model's context) were cut from the left" in result.stderr
    assert cli("generate", "--model", run, "--prompt", texts[0]).stdout == f"{reference[0]:.4f}\n"
    assert Scorer(model, tok, 4).score(texts) == pytest.approx(reference, rel=1e-5)

    with server(run) as (url, _, _lines):
        r = httpx.post(f"{url}/v1/classify", json={"model": run.name, "input": texts})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [set(d) for d in data] == [{"index", "score"}] * len(texts)
    assert [d["score"] for d in data] == pytest.approx(reference, rel=1e-5)
    assert r.json()["usage"]["prompt_tokens"] == sum(map(len, reads))
