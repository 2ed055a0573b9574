"""`llmcli serve`: a model behind the OpenAI API, batched, streaming, safe by default.

    llmcli serve --model runs/shakespeare                      # http://127.0.0.1:8000/v1
    LLMCLI_API_KEY=secret llmcli serve --model runs/sst2 --host 0.0.0.0 --port 9000

The model is loaded before the port is opened, so `/health` answers only once it is ready. The
socket is bound here (a port in use is one line and exit 1; `--port 0` takes a free port, and the
line `llmcli serve: ... on http://HOST:PORT` names it). SIGTERM/SIGINT stop accepting, let the
requests in flight finish for at most `serve.shutdown_timeout` seconds, and exit 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from llmcli import console
from llmcli.config import Config
from llmcli.errors import ConfigError, LlmcliError
from llmcli.models import load


def run(cfg: Config, checkpoint: str | None = None, device: str | None = None, dtype: str | None = None) -> None:
    if not cfg.model.model_name_or_path:
        raise ConfigError("serve needs a model: pass --model (hub id, model dir or llmcli run dir)")
    _threads_spin_briefly()
    try:
        import fastapi, prometheus_client, uvicorn  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"llmcli serve needs {err.name}: pip install 'llmcli[serve]'") from None
    s = cfg.serve
    if s.api_key is None and os.environ.get("LLMCLI_API_KEY"):
        s.api_key = os.environ["LLMCLI_API_KEY"]
    template = _chat_template(s.chat_template)
    path = load.resolve_model_path(cfg.model.model_name_or_path, checkpoint)
    model, tokenizer, kind = load.load_for_inference(path, cfg.model, device, dtype)
    kind = str(kind)
    if kind == "masked-lm":
        raise ConfigError(f"{path} is a masked LM; serve needs a causal LM (completions) or a classifier (/v1/classify)")
    context = (load.context_length(model.config) or 1024) if load.context_is_a_limit(model.config) else None
    name = s.model_name or Path(str(cfg.model.model_name_or_path).rstrip("/")).name

    from llmcli.serve.api import Service, build_app
    from llmcli.serve.engine import Engine

    metrics = Metrics()
    engine = Engine(model, tokenizer, kind, s.max_batch_size, s.max_wait_ms, observe=metrics.batch)
    metrics.watch(engine)
    service = Service(engine, tokenizer, kind, name, {str(cfg.model.model_name_or_path), path}, cfg, context, template, metrics)
    sock = _listen(s.host, s.port)
    host, port = sock.getsockname()[:2]
    if s.api_key is None and s.host not in ("127.0.0.1", "localhost", "::1"):
        console.warn(f"serving on {s.host} without an API key: anyone who can reach this port can use the model "
                     "(set --api-key or LLMCLI_API_KEY)")
    engine.start()
    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    console.info(f"llmcli serve: {name} ({kind}, {model.device}) on {where}/v1"
                 + ("" if s.api_key is None else " (API key required)") + f"; batches of up to {s.max_batch_size}")
    try:
        _serve(build_app(service), sock, s.shutdown_timeout)
    finally:
        engine.stop()
        sock.close()
    console.info("llmcli serve: stopped")


def _threads_spin_briefly() -> None:
    """Torch's CPU threads (libgomp, as Linux torch wheels use) spin 20,000 rounds at a barrier before they sleep,
    instead of libgomp's 300,000, unless the environment sets OMP_WAIT_POLICY or GOMP_SPINCOUNT. In a server they
    share the cores with the HTTP side (and often the clients), and a thread spinning through the gaps between
    decode steps takes the CPU that the event loop needs to bring in the next requests; sleeping at once
    (OMP_WAIT_POLICY=PASSIVE) costs a wake-up at every operator. On 2 cores under 64 clients the Shakespeare demo model
    served more tokens/s either way, most with the short spin; GPT-2 6x384 served the same (BENCHMARKS.md). It must be
    set before torch loads."""
    if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "20000")


def _chat_template(value: str | None) -> str | None:
    """serve.chat_template: the template itself, or a file holding it."""
    if value is None or "{" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"serve.chat_template: no such file, and not a Jinja template: {value}")
    return path.read_text(encoding="utf-8")


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise LlmcliError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def _serve(app, sock: socket.socket, shutdown_timeout: float) -> None:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            """uvicorn's, without re-raising the signal afterwards: a graceful stop exits 0."""
            handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, log_level="debug" if console.debug() else "error", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=shutdown_timeout)
    Server(config).run(sockets=[sock])


class Metrics:
    """Prometheus metrics in a registry of this server's own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("llmcli_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.latency = Histogram("llmcli_request_seconds", "Request latency (a stream: until its headers are sent)", ["path"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.prompt_tokens = Counter("llmcli_prompt_tokens", "Prompt tokens read", registry=r)
        self.completion_tokens = Counter("llmcli_completion_tokens", "Completion tokens generated", registry=r)
        self.batch_size = Histogram("llmcli_batch_size", "Rows per batched forward", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue = Histogram("llmcli_queue_seconds", "Time a row waited for its batch", registry=r,
                               buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.cancelled_total = Counter("llmcli_requests_cancelled", "Streams whose client went away before the end", registry=r)

    def watch(self, engine) -> None:
        from prometheus_client import Gauge

        Gauge("llmcli_active_rows", "Rows of the running batch still generating", registry=self.registry).set_function(lambda: engine.active)
        Gauge("llmcli_generated_tokens", "Tokens generated by the engine (cancelled rows' included)",
              registry=self.registry).set_function(lambda: engine.generated)

    def count(self, path: str, status: int, seconds: float | None = None) -> None:
        known = path if path.startswith("/v1/") or path in ("/health", "/metrics") else "other"
        self.requests.labels(known, str(status)).inc()
        if seconds is not None:
            self.latency.labels(known).observe(seconds)

    def tokens(self, usage: dict[str, int]) -> None:
        self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        self.completion_tokens.inc(usage.get("completion_tokens", 0))

    def batch(self, batch_size: int | None = None, queue_s: tuple[float, ...] = ()) -> None:
        """A forward's rows (each decode step of the running batch), or the queue time of rows starting."""
        if batch_size is not None:
            self.batch_size.observe(batch_size)
        for q in queue_s:
            self.queue.observe(q)

    def cancelled(self) -> None:
        self.cancelled_total.inc()

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
