"""The HTTP side of `llmcli serve`: the OpenAI API's completions, chat completions and models
endpoints, `/v1/classify`, `/health` and Prometheus `/metrics`, on FastAPI.

Errors are the OpenAI error object, `{"error": {"message", "type", "param", "code"}}`, with a 4xx
status for anything the client sent (FastAPI's 422 validation errors become 400, as OpenAI's are).
A stream is `text/event-stream`: `data: {chunk}` lines, the first carrying the id (and, for chat,
the role), one token's text per chunk, `finish_reason` on each choice's last, usage when asked,
then `data: [DONE]`; an error after the stream started is sent as an error event before [DONE].
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any

from llmcli.generate.generate import NO_START, _encode, classifier_ids
from llmcli.serve.engine import Engine, Job, Sampling
from llmcli.serve.protocol import ApiError, ChatRequest, ClassifyRequest, CompletionRequest, SamplingRequest


class Service:
    """What the endpoints share: the model's tokenizer and limits, the engine, the settings, the metrics."""

    def __init__(self, engine: Engine, tokenizer, kind: str, name: str, aliases: set[str], cfg, context: int | None,
                 chat_template: str | None, metrics):
        self.engine, self.tokenizer, self.kind, self.name = engine, tokenizer, kind, name
        self.aliases, self.cfg, self.context, self.metrics = aliases | {name}, cfg, context, metrics
        self.chat_template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        self.created = int(time.time())

    # -- checks shared by the endpoints ----------------------------------------------------

    def check_model(self, name: str) -> None:
        if name not in self.aliases:
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.name}'", "model", "model_not_found")

    def check_generator(self, endpoint: str) -> None:
        if self.kind != "causal-lm":
            raise ApiError(400, f"'{self.name}' is a {self.kind} model: {endpoint} needs a causal LM; use /v1/classify",
                           "model", "wrong_model_kind")

    def encode(self, text: str, param: str) -> list[int]:
        ids = _encode(self.tokenizer, text)
        if ids is None:
            raise ApiError(400, f"{param}: {NO_START}", param)
        return ids

    def job(self, req: SamplingRequest, prompts: list[list[int]], emit, logprobs: int | None) -> Job:
        g = self.cfg.generation
        limit = self.cfg.serve.max_tokens
        max_tokens = req.max_tokens or getattr(req, "max_completion_tokens", None) or g.max_new_tokens
        if max_tokens > limit:
            raise ApiError(400, f"max_tokens={max_tokens} is above this server's limit of {limit} (serve.max_tokens)", "max_tokens")
        if self.context is not None:
            for ids in prompts:
                if len(ids) + max_tokens > self.context:
                    raise ApiError(400, f"This model's maximum context length is {self.context} tokens; the prompt has {len(ids)} "
                                        f"and max_tokens asks for {max_tokens} more", "prompt", "context_length_exceeded")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise ApiError(400, f"{name} is not supported (use repetition_penalty)", name, "unsupported_parameter")
        if len(prompts) * req.n > 4 * self.cfg.serve.max_batch_size:
            raise ApiError(400, f"{len(prompts)} prompts x n={req.n} rows is more than 4 x serve.max_batch_size", "n")
        temperature = req.temperature if req.temperature is not None else g.temperature
        sampling = Sampling(temperature=temperature, top_p=req.top_p if req.top_p is not None else g.top_p,
                            top_k=req.top_k if req.top_k is not None else g.top_k, min_p=req.min_p if req.min_p is not None else g.min_p,
                            repetition_penalty=req.repetition_penalty or g.repetition_penalty,
                            seed=req.seed if req.seed is not None else g.seed)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or g.stop)
        if "" in stop:
            raise ApiError(400, "stop: an empty stop string would cut every completion before its first token", "stop")
        return Job("generate", prompts, emit, n=req.n, max_tokens=max_tokens, stop=stop, logprobs=logprobs, sampling=sampling,
                   stream=req.stream)

    # -- running a job ---------------------------------------------------------------------

    def submit(self, build) -> tuple[Job, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = build(lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        self.engine.submit(job)
        return job, events

    async def collect(self, job: Job, events: asyncio.Queue, rows: int) -> dict[int, dict[str, Any]]:
        """Wait for every row's end event: index -> {text, completion_tokens, finish_reason, logprobs}."""
        out: dict[int, dict[str, Any]] = {}
        tokens: dict[int, list[dict[str, Any]]] = {}
        try:
            while len(out) < rows:
                event = await events.get()
                if event["type"] == "error":
                    raise ApiError(500, event["message"], type_="server_error")
                if event["type"] == "token":
                    tokens.setdefault(event["index"], []).append(event)
                elif event["type"] in ("end", "classified"):
                    out[event["index"]] = {**event, "tokens": tokens.get(event["index"], [])}
        finally:
            if len(out) < rows:
                job.cancelled.set()
        return out


def build_app(service: Service):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    app = FastAPI(title="llmcli serve", docs_url=None, redoc_url=None, openapi_url=None)
    serve_cfg = service.cfg.serve
    m = service.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            at = f" at character {loc[-1]}" if loc else ""
            message = f"malformed JSON in the request body{at}: {first.get('ctx', {}).get('error', first.get('msg', ''))}"
            return JSONResponse(ApiError(400, message).body(), status_code=400)
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}" + (
                f", got {first['input']!r}" if "input" in first and not isinstance(first["input"], dict) else "")
        return JSONResponse(ApiError(400, message, ".".join(loc) or None).body(), status_code=400)

    app.add_middleware(_Guard, cfg=serve_cfg, metrics=m)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name}

    @app.get("/metrics")
    async def metrics():
        body, content_type = m.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created, "owned_by": "llmcli"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        service.check_model(req.model)
        service.check_generator("/v1/completions")
        if req.echo and req.logprobs is not None:
            raise ApiError(400, "echo with logprobs is not supported (the prompt's tokens are not scored)", "echo")
        texts, prompts = _prompts(service, req.prompt)
        job, events = service.submit(lambda emit: service.job(req, prompts, emit, req.logprobs))
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": service.name}

        def choice(i: int, r: dict[str, Any]) -> dict[str, Any]:
            text = (texts[i // req.n] if req.echo else "") + r["completion"]
            return {"index": i, "text": text, "logprobs": _completion_logprobs(r["tokens"], r, req.logprobs), "finish_reason": r["finish_reason"]}

        return await _respond(service, req, job, events, meta, choice, chat=False, echo=texts if req.echo else None)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        service.check_model(req.model)
        service.check_generator("/v1/chat/completions")
        ids = _chat_prompt(service, req)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        job, events = service.submit(lambda emit: service.job(req, [ids], emit, logprobs))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()), "model": service.name}

        def choice(i: int, r: dict[str, Any]) -> dict[str, Any]:
            return {"index": i, "message": {"role": "assistant", "content": r["completion"]},
                    "logprobs": {"content": _chat_logprobs(r["tokens"])} if req.logprobs else None, "finish_reason": r["finish_reason"]}

        return await _respond(service, req, job, events, meta, choice, chat=True)

    @app.post("/v1/classify")
    async def classify(req: ClassifyRequest):
        service.check_model(req.model)
        if service.kind != "classification":
            raise ApiError(400, f"'{service.name}' is a {service.kind} model: /v1/classify needs a classifier or reward model; "
                                "use /v1/completions", "model", "wrong_model_kind")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if len(texts) > 4 * serve_cfg.max_batch_size:
            raise ApiError(400, f"{len(texts)} inputs is more than 4 x serve.max_batch_size", "input")
        limit = service.context or 10**9
        prompts = [classifier_ids(service.engine.model, service.tokenizer, service.encode(t, "input"), limit)[0] for t in texts]
        job, events = service.submit(lambda emit: Job("classify", prompts, emit))
        rows = await service.collect(job, events, len(prompts))
        data = [{"index": i, **{k: v for k, v in rows[i].items() if k in ("label", "score", "scores")}} for i in sorted(rows)]
        usage = {"prompt_tokens": sum(map(len, prompts)), "total_tokens": sum(map(len, prompts))}
        m.tokens(usage)
        return JSONResponse({"object": "list", "model": service.name, "data": data, "usage": usage})

    return app


class _Guard:
    """The API key, the body-size cap and the request metrics, as plain ASGI middleware (Starlette's
    `@app.middleware("http")` wraps every request in extra tasks and streams: milliseconds each)."""

    def __init__(self, app, cfg, metrics):
        self.app, self.cfg, self.metrics = app, cfg, metrics
        self.expected = f"Bearer {cfg.api_key}".encode() if cfg.api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, path = time.perf_counter(), scope["path"]
        headers = dict(scope["headers"])
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            error = ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
            return await self._refuse(error, path, scope, receive, send)
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > self.cfg.max_request_bytes:
            error = ApiError(413, f"request body of {int(size)} bytes is above serve.max_request_bytes ({self.cfg.max_request_bytes})",
                             code="request_too_large")
            return await self._refuse(error, path, scope, receive, send)

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count(path, message["status"], time.perf_counter() - start)
            await send(message)

        await self.app(scope, receive, counted_send)

    async def _refuse(self, error: ApiError, path: str, scope, receive, send) -> None:
        from fastapi.responses import JSONResponse

        self.metrics.count(path, error.status)
        await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


def _prompts(service: Service, prompt) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids) of a completions prompt: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: empty list", "prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    vocab = len(service.tokenizer)
    texts, ids = [], []
    for p in prompt:
        if isinstance(p, str):
            texts.append(p)
            ids.append(service.encode(p, "prompt"))
        else:
            if not p or any(t < 0 or t >= vocab for t in p):
                raise ApiError(400, f"prompt: token ids must be a non-empty list of ids in 0..{vocab - 1}", "prompt")
            texts.append(service.tokenizer.decode(p))
            ids.append(list(p))
    return texts, ids


def _chat_prompt(service: Service, req: ChatRequest) -> list[int]:
    if not service.chat_template:
        raise ApiError(400, f"model '{service.name}' has no chat template, so /v1/chat/completions cannot format messages; "
                            "/v1/completions serves it with a plain prompt (or give one: serve.chat_template)",
                       "messages", "model_has_no_chat_template")
    messages = []
    for msg in req.messages:
        content = msg.content
        if isinstance(content, list):  # content parts: the text ones
            content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
        messages.append({"role": msg.role, "content": content or ""})
    try:
        text = service.tokenizer.apply_chat_template(messages, chat_template=service.chat_template, add_generation_prompt=True,
                                                     tokenize=False)
    except Exception as err:  # a template that raises on these messages (e.g. a role it refuses)
        raise ApiError(400, f"messages: the chat template refused them: {err}", "messages") from None
    ids = service.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ApiError(400, "messages: the chat template rendered them as empty text", "messages")
    return ids


async def _respond(service: Service, req, job: Job, events: asyncio.Queue, meta: dict[str, Any], choice, chat: bool,
                   echo: list[str] | None = None):
    """A stream of the job's events, or (waiting for every row) the whole response with its usage."""
    from fastapi.responses import JSONResponse, StreamingResponse

    prompt_tokens = sum(map(len, job.prompts))  # each prompt once, whatever n
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
    if req.stream:
        stream_meta = {**meta, "object": "chat.completion.chunk"} if chat else meta
        return StreamingResponse(_stream(service, job, events, stream_meta, usage, req, chat=chat, echo=echo),
                                 media_type="text/event-stream")
    rows = await service.collect(job, events, len(job.prompts) * job.n)
    usage["completion_tokens"] = sum(r["completion_tokens"] for r in rows.values())
    usage["total_tokens"] = prompt_tokens + usage["completion_tokens"]
    service.metrics.tokens(usage)
    return JSONResponse({**meta, "choices": [choice(i, rows[i]) for i in sorted(rows)], "usage": usage})


def _completion_logprobs(tokens: list[dict[str, Any]], row: dict[str, Any], k: int | None) -> dict[str, Any] | None:
    """The legacy completions logprobs object for the tokens of the returned text."""
    if k is None:
        return None
    kept = tokens[: row["completion_tokens"]]
    offsets, at = [], 0
    for t in kept:
        offsets.append(at)
        at += len(t.get("piece", ""))
    return {"tokens": [t.get("piece", "") for t in kept], "token_logprobs": [t.get("logprob") for t in kept],
            "top_logprobs": [t.get("top_logprobs") for t in kept] if k else None, "text_offset": offsets}


def _chat_logprobs(tokens: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"token": t.get("piece", ""), "logprob": t.get("logprob"), "bytes": list(t.get("piece", "").encode()),
             "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode())} for k, v in (t.get("top_logprobs") or {}).items()]}
            for t in tokens]


async def _stream(service: Service, job: Job, events: asyncio.Queue, meta: dict[str, Any], usage: dict[str, int], req, chat: bool,
                  echo: list[str] | None = None):
    """Server-sent events of one request; a client that goes away cancels its rows."""
    rows, ended = len(job.prompts) * job.n, 0
    finished = False

    def chunk(index: int, text: str | None, finish_reason: str | None = None, event: dict | None = None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            if event and "logprob" in event:
                choice["logprobs"] = {"content": _chat_logprobs([event])}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            if event and "logprob" in event:
                choice["logprobs"] = {"tokens": [event.get("piece", "")], "token_logprobs": [event["logprob"]],
                                      "top_logprobs": [event["top_logprobs"]] if "top_logprobs" in event else None, "text_offset": [0]}
        return "data: " + json.dumps({**meta, "choices": [choice]}, ensure_ascii=False) + "\n\n"

    try:
        for i in range(rows):
            if chat:  # the first chunk of each choice carries the role
                yield "data: " + json.dumps({**meta, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                                  "logprobs": None, "finish_reason": None}]}) + "\n\n"
            elif echo is not None:
                yield chunk(i, echo[i // job.n])
        while ended < rows:
            event = await events.get()
            if event["type"] == "error":
                yield "data: " + json.dumps(ApiError(500, event["message"], type_="server_error").body()) + "\n\n"
                break
            if event["type"] == "token":
                if event["text"] or "logprob" in event:
                    yield chunk(event["index"], event["text"], event=event)
            elif event["type"] == "end":
                ended += 1
                usage["completion_tokens"] += event["completion_tokens"]
                yield chunk(event["index"], event["text"] if event["text"] or not chat else None, event["finish_reason"])
        else:
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            service.metrics.tokens(usage)
            if (req.stream_options or {}).get("include_usage"):
                yield "data: " + json.dumps({**meta, "choices": [], "usage": usage}) + "\n\n"
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            job.cancelled.set()  # its rows stop at the next step; the engine drops queued ones
            service.metrics.cancelled()
