"""Serving benchmark: `llmcli serve` under concurrent `openai` clients, against the same requests sent one at a
time, against offline `llmcli generate` batches, and against `transformers serve` on the same model.

Two models, both saved locally: the Shakespeare demo (configs/shakespeare.yaml's GPT-2 4x128, a few training
steps: the architecture is what costs) and a GPT-2 6x384 with GPT-2's own BPE (random weights). Every request is
greedy, `max_tokens` tokens from one of 64 Shakespeare prompts; throughput counts the completion tokens the
servers report. Each server first gets one untimed round of the concurrent load (the first batch of each shape
is slow on CPU), the offline batches one untimed batch. Offline batches, the server's engine alone (in this process, 64
client threads in a closed loop, no HTTP) and the 64-client load then alternate `--repeats` times (medians reported,
and each round's ratio). Rows per decode step (the engine's; the server's from its /metrics) show how full the batch
ran, and CPU per request (the server's and the clients' for the served load) where the time went. Then 10,000 short
requests, the llmcli server's RSS before and after.

    python scripts/bench_serve.py --text data/tinyshakespeare.txt --gpt2-tokenizer ../shared/data/gpt2_bpe
    python scripts/bench_serve.py ... --quick          # fewer requests, 1,000 in the soak
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def build_models(work: Path, text: Path, gpt2_tokenizer: Path) -> dict[str, Path]:
    demo = work / "shakespeare"
    if not (demo / "model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "llmcli", "pretrain", "--config", str(ROOT / "configs" / "shakespeare.yaml"),
                        "--set", f"data.train_file={text}", "--set", "training.max_steps=20", "--set", "training.eval_strategy=no",
                        "-o", str(demo), "--quiet", "--overwrite"], check=True)
    big = work / "gpt2-6x384"
    if not (big / "model.safetensors").exists():
        from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

        import torch

        torch.manual_seed(0)
        tok = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer)
        model = GPT2LMHeadModel(GPT2Config(n_layer=6, n_embd=384, n_head=6, n_positions=1024, vocab_size=len(tok)))
        model.save_pretrained(big)
        tok.save_pretrained(big)
    return {"shakespeare demo (GPT-2 4x128)": demo, "GPT-2 6x384": big}


def prompts_from(text: Path, n: int = 64) -> list[str]:
    lines = [line.strip() for line in text.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 20]
    return lines[:: max(1, len(lines) // n)][:n]


class Server:
    """A server subprocess; `url` once it answers /health."""

    def __init__(self, cmd: list[str], port: int | None = None, ready_pattern: str | None = None, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        found = threading.Event()
        self.url = f"http://127.0.0.1:{port}" if port else None

        def read():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(ready_pattern, line) if ready_pattern else None
                if m:
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if ready_pattern:
            found.wait(300)
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"server exited: {''.join(self.lines[-30:])}")
            try:
                if self.url and httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        sys.exit(f"server not ready: {''.join(self.lines[-30:])}")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def load(url: str, model: str, prompts: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    """`clients` concurrent openai clients, each sending `per_client` requests one after another."""
    import openai

    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    latencies, tokens = [], 0

    async def one_client(c: int):
        nonlocal tokens
        for r in range(per_client):
            start = time.perf_counter()
            out = await api.completions.create(model=model, prompt=prompts[(c * per_client + r) % len(prompts)], max_tokens=max_tokens,
                                               temperature=0)
            latencies.append(time.perf_counter() - start)
            tokens += out.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    await api.close()
    latencies.sort()
    return {"clients": clients, "requests": len(latencies), "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(latencies), "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


class Offline:
    """llmcli generate's batched path in this process, the model loaded once: greedy, batches of `batch`."""

    def __init__(self, model_dir: Path, prompts: list[str], max_tokens: int, batch: int):
        from llmcli.config import GenerationSection, ModelSection
        from llmcli.generate.generate import _encode
        from llmcli.models import load

        self.model, self.tok, _ = load.load_for_inference(str(model_dir), ModelSection(), "cpu", None)
        self.g = GenerationSection(max_new_tokens=max_tokens, temperature=0, batch_size=batch)
        self.encoded, self.batch = sorted((_encode(self.tok, p) for p in prompts), key=len), batch
        self.run(self.encoded[:batch])  # warm-up

    def run(self, encoded: list | None = None) -> dict:
        from llmcli.generate.generate import _generate_batch

        encoded = self.encoded if encoded is None else encoded
        start, cpu, tokens = time.perf_counter(), cpu_s(), 0
        for b in range(0, len(encoded), self.batch):
            tokens += sum(r["completion_tokens"][0] for r in _generate_batch(self.model, self.tok, encoded[b : b + self.batch], self.g))
        wall = time.perf_counter() - start
        return {"completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "cpu_s": cpu_s() - cpu}


class EngineOnly:
    """The server's engine (`llmcli.serve.engine.Engine`, serve's default settings) in this process, without HTTP:
    `clients` threads in a closed loop, each submitting a tokenized prompt and waiting for its end. Shows what the
    engine alone does with the same model and load, so that the served rate splits into engine and HTTP."""

    def __init__(self, offline: Offline, prompts: list[str]):
        from llmcli.config import ServeSection
        from llmcli.generate.generate import _encode
        from llmcli.serve.engine import Engine

        s = ServeSection()
        self.encoded, self.steps = [_encode(offline.tok, p) for p in prompts], []  # as the server tokenizes them
        self.engine = Engine(offline.model, offline.tok, "causal-lm", s.max_batch_size, s.max_wait_ms,
                             observe=lambda batch_size=None, **_: batch_size is not None and self.steps.append(batch_size))
        self.engine.start()

    def run(self, clients: int, per_client: int, max_tokens: int) -> dict:
        from llmcli.serve.engine import Job, Sampling

        tokens, lock = [], threading.Lock()

        def client(c: int) -> None:
            for r in range(per_client):
                done = threading.Event()

                def emit(event, done=done):
                    if event["type"] == "end":
                        with lock:
                            tokens.append(event["completion_tokens"])
                        done.set()

                prompt = self.encoded[(c * per_client + r) % len(self.encoded)]
                self.engine.submit(Job("generate", [prompt], emit, max_tokens=max_tokens, sampling=Sampling(0, None, None, None, None, None),
                                       stream=False))
                done.wait()

        self.steps.clear()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        start, cpu = time.perf_counter(), cpu_s()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        return {"completion_tokens": sum(tokens), "wall_s": wall, "tokens_per_s": sum(tokens) / wall, "cpu_s": cpu_s() - cpu,
                "rows_per_step": sum(self.steps) / max(1, len(self.steps))}

    def stop(self) -> None:
        self.engine.stop()


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process (all its threads), or by process `pid`."""
    if pid is None:
        import resource

        use = resource.getrusage(resource.RUSAGE_SELF)
        return use.ru_utime + use.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rows_per_step(url: str) -> tuple[float, float]:
    """The server's `llmcli_batch_size` histogram: (sum, count) of rows over its forwards."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {m.group(1): float(m.group(2)) for m in re.finditer(r"^llmcli_batch_size_(sum|count) (\S+)$", text, re.M)}
    return found["sum"], found["count"]


def served(srv: Server, prompts: list[str], clients: int, per_client: int, max_tokens: int) -> dict:
    """`load` on the llmcli server, plus the mean rows per forward it ran meanwhile (from /metrics) and the CPU
    seconds of the server and of the clients (this process)."""
    s0, c0 = rows_per_step(srv.url)
    server0, client0 = cpu_s(srv.proc.pid), cpu_s()
    out = asyncio.run(load(srv.url, "m", prompts, clients, per_client, max_tokens))
    server1, client1 = cpu_s(srv.proc.pid), cpu_s()
    s1, c1 = rows_per_step(srv.url)
    return {**out, "rows_per_step": (s1 - s0) / max(1, c1 - c0), "server_cpu_s": server1 - server0, "client_cpu_s": client1 - client0,
            "cpu_s": server1 - server0 + client1 - client0}


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True, help="Tiny Shakespeare (prompts; and the demo model's training text)")
    ap.add_argument("--gpt2-tokenizer", required=True, help="a GPT-2 tokenizer dir (vocab.json + merges.txt)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=4, help="requests each concurrent client sends")
    ap.add_argument("--sequential", type=int, default=32, help="requests sent one at a time")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="alternating offline / 64-client rounds (medians reported)")
    ap.add_argument("--soak", type=int, default=10_000, help="short requests for the RSS check (0: skip)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--only", help="run only the models whose label contains this (e.g. shakespeare)")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                    help="set in the llmcli server's environment (e.g. OMP_WAIT_POLICY= for libgomp's default wait policy)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default="bench-out/serve-models")
    ap.add_argument("--out", default="bench-out/serve.json")
    args = ap.parse_args()
    if args.quick:
        args.per_client, args.sequential, args.soak = 1, 8, 1000
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = build_models(work, Path(args.text).resolve(), Path(args.gpt2_tokenizer).resolve())
    prompts = prompts_from(Path(args.text))
    results = {}
    for label, model_dir in models.items():
        if args.only and args.only.lower() not in label.lower():
            continue
        r: dict = {"model_dir": str(model_dir)}
        offline = Offline(model_dir, [prompts[i % len(prompts)] for i in range(args.clients * args.per_client)], args.max_tokens,
                          args.clients)
        srv = Server([sys.executable, "-m", "llmcli", "serve", "--model", str(model_dir), "--port", "0", "--model-name", "m"],
                     ready_pattern=r"on (http://127\.0\.0\.1:\d+)/v1", env=dict(kv.split("=", 1) for kv in args.server_env))
        try:
            asyncio.run(load(srv.url, "m", prompts, args.clients, 1, args.max_tokens))  # warm-up: first batches of each shape are slow
            r["llmcli_sequential"] = asyncio.run(load(srv.url, "m", prompts, 1, args.sequential, args.max_tokens))
            # offline and served rounds alternate (the server idles while offline runs), so that a slower spell of a
            # shared machine does not land on one side only; the medians are reported
            rounds = []
            engine = EngineOnly(offline, prompts)
            engine.run(args.clients, 1, args.max_tokens)  # its warm-up
            for _ in range(args.repeats):
                rounds.append({"offline_generate": offline.run(),
                               "engine_only": engine.run(args.clients, args.per_client, args.max_tokens),
                               "llmcli_concurrent": served(srv, prompts, args.clients, args.per_client, args.max_tokens)})
            engine.stop()
            r["rounds"] = rounds
            for key in ("offline_generate", "engine_only", "llmcli_concurrent"):
                r[key] = median_run([x[key] for x in rounds])
            if args.soak and label.startswith("shakespeare"):
                before = srv.rss_mib()
                soak = asyncio.run(load(srv.url, "m", prompts, args.clients, args.soak // args.clients, 4))
                r["soak"] = {"requests": soak["requests"], "wall_s": soak["wall_s"], "rss_before_mib": before, "rss_after_mib": srv.rss_mib()}
        finally:
            srv.stop()
        del offline
        if not args.skip_transformers:
            port = free_port()
            hf = Server(["transformers", "serve", str(model_dir), "--port", str(port), "--host", "127.0.0.1"], port=port)
            try:
                asyncio.run(load(hf.url, str(model_dir), prompts, args.clients, 1, args.max_tokens))  # the same warm-up
                r["transformers_serve_concurrent"] = asyncio.run(load(hf.url, str(model_dir), prompts, args.clients, args.per_client,
                                                                      args.max_tokens))
            finally:
                hf.stop()
        conc, seq, off = r["llmcli_concurrent"], r["llmcli_sequential"], r["offline_generate"]
        r["ratios"] = {"concurrent_over_sequential": conc["tokens_per_s"] / seq["tokens_per_s"],
                       "concurrent_over_offline_generate": conc["tokens_per_s"] / off["tokens_per_s"],
                       "engine_only_over_offline_generate": r["engine_only"]["tokens_per_s"] / off["tokens_per_s"],
                       "concurrent_over_offline_each_round": [x["llmcli_concurrent"]["tokens_per_s"] / x["offline_generate"]["tokens_per_s"]
                                                              for x in r["rounds"]]}
        if "transformers_serve_concurrent" in r:
            r["ratios"]["llmcli_over_transformers_serve"] = conc["tokens_per_s"] / r["transformers_serve_concurrent"]["tokens_per_s"]
        results[label] = r

    print(f"{'model':30} {'workload':34} {'tok/s':>9} {'p50 s':>7} {'p99 s':>7} {'rows/step':>9} {'CPU ms/request':>14}")
    per_request = args.clients * args.per_client / 1000
    for label, r in results.items():
        for key, name in (("offline_generate", f"llmcli generate, batches of {args.clients}"), ("llmcli_sequential", "llmcli serve, 1 client"),
                          ("engine_only", f"serve's engine, {args.clients} threads"),
                          ("llmcli_concurrent", f"llmcli serve, {args.clients} clients"),
                          ("transformers_serve_concurrent", f"transformers serve, {args.clients} clients")):
            if key in r:
                x = r[key]
                print(f"{label:30} {name:34} {x['tokens_per_s']:9.1f} {x.get('p50_s', float('nan')):7.3f} {x.get('p99_s', float('nan')):7.3f} "
                      f"{x.get('rows_per_step', float('nan')):9.1f} {x.get('cpu_s', float('nan')) / per_request:14.1f}")
        print(f"{label:30} ratios: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} " + "/".join(f"{x:.2f}" for x in v)
                                                  for k, v in r["ratios"].items()))
        c = r["llmcli_concurrent"]
        print(f"{label:30} served CPU per request: server {c['server_cpu_s'] / per_request:.1f} ms, clients {c['client_cpu_s'] / per_request:.1f} ms")
        if "soak" in r:
            s = r["soak"]
            print(f"{label:30} soak: {s['requests']} requests in {s['wall_s']:.0f} s, RSS {s['rss_before_mib']:.0f} -> {s['rss_after_mib']:.0f} MiB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "llmcli serve", "machine": f"{os.cpu_count()} CPU cores",
                                          "settings": vars(args), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
