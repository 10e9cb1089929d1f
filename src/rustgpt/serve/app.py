"""The server's HTTP side, on Starlette (asyncio): OpenAI's routes and wire format, the API
key, limits, access logs and the chat page. It never calls a kernel: a request becomes an
engine Job (rustgpt.serve.engine), whose updates come back through the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import pickle
import random
import time
from importlib import resources
from typing import AsyncIterator, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from rustgpt.config import GenerationConfig
from rustgpt.errors import ValidationError
from rustgpt.generation import _check_options, chat_prompt, default_max_tokens
from rustgpt.model import LLM
from rustgpt.serve.engine import Engine, Job, QueueFull
from rustgpt.serve.metrics import Metrics
from rustgpt.serve.process import EngineProcess

log = logging.getLogger(__name__)
access_log = logging.getLogger("rustgpt.serve.access")

MODEL_ID = "rustgpt"  # the name /v1/models lists and requests give as "model"
MAX_BODY = 1 << 20  # bytes of a request body
# bodies up to this many bytes are tokenized on the event loop (a worker thread's hop costs
# more than their few tokens); larger ones in a worker thread, not to hold up the streams
INLINE_TOKENIZE = 4096
RETRY_AFTER = 1  # seconds a client told "queue full" waits before trying again
MAX_STOP = 4  # stop strings per request, as OpenAI
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
_MARK = "\0text\0"  # stands for a chunk's text while its event is rendered once
# completion ids: 96 random bits from a generator seeded once by the OS (uuid4 would ask the
# OS for every request; a count would tell clients how many requests the server answered)
_IDS = random.Random()
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# request fields by route, each with its JSON type; other fields are refused unless null or
# at the neutral value below (a client that sends "n": 1 or "logprobs": false asks nothing)
_FIELDS = {"model": "string", "max_tokens": "integer", "temperature": "number",
           "top_p": "number", "stop": "string or array", "seed": "integer", "n": "integer",
           "stream": "boolean", "stream_options": "object", "user": "string",
           "top_k": "integer", "min_p": "number", "repetition_penalty": "number"}
_CHAT_FIELDS = {**_FIELDS, "messages": "array", "max_completion_tokens": "integer"}
_COMPLETION_FIELDS = {**_FIELDS, "prompt": "string or array"}
_NEUTRAL = {"logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,),
            "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},),
            "tools": ([],), "functions": ([],), "tool_choice": ("none",),
            "response_format": ({"type": "text"},), "parallel_tool_calls": (False,)}
_KINDS = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string or array": lambda v: isinstance(v, (str, list)),
}


class ApiError(Exception):
    """An error answered in OpenAI's format: status, message, type, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers

    def body(self) -> dict:
        """{"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        """The JSON body with the status (and headers)."""
        return JSONResponse(self.body(), self.status, headers=self.headers)


def _json_kind(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object", type(None): "null"}.get(type(value), "?")


def _typed(body: dict, name: str, kind: str, where: str = ""):
    """body[name] (None when absent or null) after checking its JSON type."""
    value = body.get(name)
    if value is not None and not _KINDS[kind](value):
        article = "an" if kind[0] in "aeiou" else "a"
        raise ApiError(400, f"{where}{name} is {_json_kind(value)}, expected {article} {kind}",
                       param=where + name)
    return value


class _Server:
    """What the routes share: the engine, metrics, settings, and whether the server is
    draining (set by rustgpt.serve.server on SIGTERM)."""

    def __init__(self, engine: Engine | EngineProcess, metrics: Metrics, api_key: str | None,
                 generation: GenerationConfig, model_name: str) -> None:
        self.engine, self.metrics, self.api_key = engine, metrics, api_key
        self.generation, self.model_name = generation, model_name
        self.created = int(time.time())
        self.draining = False

    @property
    def status(self) -> str:
        """"ok", or why requests are refused: "loading", "draining", "failed"."""
        if self.draining:
            return "draining"
        return {"ready": "ok", "stopped": "draining"}.get(self.engine.state, self.engine.state)

    def authorize(self, request: Request) -> None:
        """Raise 401 unless the request carries the key (when there is one)."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def available(self) -> None:
        """Raise 503 while the model loads, the server drains, or after a failure."""
        status = self.status
        if status != "ok":
            detail = f": {self.engine.error}" if status == "failed" else ""
            raise ApiError(503, f"the server is {status}{detail}", kind="server_error",
                           code=f"server_{status}", headers={"Retry-After": str(RETRY_AFTER)})


def create_app(model: LLM | Callable[[], LLM], *, api_key: str | None = None,
               generation: GenerationConfig | None = None, max_batch: int = 16,
               max_queue: int = 64, threads: int | None = None,
               model_name: str = MODEL_ID, process: bool = False) -> Starlette:
    """The ASGI app serving `model` (an LLM, or a function that loads one: it runs on the
    engine thread at startup, while /health answers 503 "loading").

    Routes: POST /v1/chat/completions and /v1/completions (OpenAI's, streaming or not),
    GET /v1/models, /health (no key needed), /metrics (Prometheus) and / (the chat page).
    api_key: every route but /health and the page needs ``Authorization: Bearer KEY``.
    generation: the settings of parameters a request leaves out (``[generation]``; greedy
    by default), and the matmuls' precision (its ``precision``: fp32, bf16 or auto).
    max_batch: rows decoded together; max_queue: requests waiting beyond them (more get
    429); threads: kernel threads of the engine (None: the process's). The engine starts
    and stops with the app's lifespan. process: run the engine in a process of its own
    (rustgpt.serve.process; what ``rustgpt-cli serve`` does), so that its Python and the
    event loop's do not wait for each other; `model` must then be a loader that can be
    pickled (a module-level function, or functools.partial of one), and a script that
    starts the app needs the ``if __name__ == "__main__":`` guard (the process is spawned,
    and imports the script's module again)."""
    metrics = Metrics(max_batch)
    generation = generation or GenerationConfig()
    options = dict(max_batch=max_batch, max_queue=max_queue, threads=threads, metrics=metrics,
                   precision=generation.precision)
    if process:
        try:  # an LLM is refused before it is pickled (its weights would be)
            picklable = not isinstance(model, LLM) and bool(pickle.dumps(model))
        except Exception:
            picklable = False
        if not picklable:
            raise ValidationError("create_app(process=True): the engine's process loads the "
                                  "model itself, expected a loader that can be pickled "
                                  "(functools.partial of a module-level function)")
        engine = EngineProcess(model, **options)
    else:
        engine = Engine((lambda: model) if isinstance(model, LLM) else model, **options)
    server = _Server(engine, metrics, api_key, generation, model_name)
    page = resources.files("rustgpt.serve").joinpath("static/index.html").read_text("utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()

        def deliver(updates):
            for job, text, reason in updates:
                job.inbox.put_nowait((text, reason))

        def sink(updates):  # on the engine thread
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(deliver, updates)

        engine.start(sink)
        yield
        await asyncio.to_thread(engine.stop)

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> Response:
        status = server.status
        return JSONResponse({"status": status}, 200 if status == "ok" else 503)

    async def metrics_route(request: Request) -> Response:
        server.authorize(request)
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def models(request: Request) -> Response:
        server.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": server.created,
             "owned_by": "rustgpt"}]})

    async def chat_completions(request: Request) -> Response:
        return await _complete(server, request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(server, request, chat=False)

    async def api_error(request: Request, err: ApiError) -> Response:
        return err.response()

    async def http_error(request: Request, err: HTTPException) -> Response:
        return ApiError(err.status_code, f"{request.method} {request.url.path}: "
                        f"{err.detail}", code=None).response()

    async def internal_error(request: Request, err: Exception) -> Response:
        # the ASGI server logs the traceback (uvicorn: as "Exception in ASGI application")
        log.error("serve: %s %s failed: %r", request.method, request.url.path, err)
        return ApiError(500, "internal error (the server's log has the details)",
                        kind="server_error").response()

    app = Starlette(
        routes=[Route("/", index), Route("/health", health), Route("/metrics", metrics_route),
                Route("/v1/models", models),
                Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                Route("/v1/completions", completions, methods=["POST"])],
        exception_handlers={ApiError: api_error, HTTPException: http_error,
                            Exception: internal_error},
        lifespan=lifespan)
    app.state.rustgpt = server
    app.add_middleware(_AccessLog, metrics=metrics)
    return app


class _AccessLog:
    """ASGI middleware: one access-log record per HTTP request (when its response ends)
    and the requests metric by route and status."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began, status = time.perf_counter(), [500]

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            ms = (time.perf_counter() - began) * 1e3
            client = "%s:%s" % tuple(scope["client"]) if scope.get("client") else "-"
            self.metrics.requests.labels(path if path in ROUTES else "other", status[0]).inc()
            access_log.info("%s %s %s %d %.1f ms", client, scope["method"], path, status[0],
                            ms, extra={"client": client, "method": scope["method"],
                                       "path": path, "status": status[0],
                                       "duration_ms": round(ms, 1)})


# ---- completions ------------------------------------------------------------------------

async def _read_json(request: Request) -> tuple[dict, int]:
    """The request's JSON object and the body's size in bytes: 413 past MAX_BODY bytes, 400
    for anything but JSON."""
    too_big = ApiError(413, f"the request body is larger than {MAX_BODY} bytes",
                       code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise too_big
    except ClientDisconnect:  # nobody reads the answer; the access log shows the 400
        raise ApiError(400, "the client left before sending the whole body") from None
    try:
        data = json.loads(body)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ApiError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body is {_json_kind(data)}, expected a JSON object")
    return data, len(body)


def _options(server: _Server, body: dict, chat: bool) -> dict:
    """The request's checked options (the server's settings where it gives none)."""
    fields = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    for name, value in body.items():
        if name not in fields and value is not None and value not in _NEUTRAL.get(name, ()):
            raise ApiError(400, f"{name} is not supported by this server", param=name,
                           code="unsupported_parameter")
    opts = {name: _typed(body, name, kind) for name, kind in fields.items()}
    if opts["model"] is None:
        raise ApiError(400, "model is missing, expected a string", param="model")
    if opts["model"] != server.model_name:
        raise ApiError(404, f"model {opts['model']!r} does not exist: this server serves "
                            f"{server.model_name!r}", param="model", code="model_not_found")
    if opts["n"] not in (None, 1):
        raise ApiError(400, f"n = {opts['n']} is not supported: one choice per request",
                       param="n", code="unsupported_parameter")
    if chat and opts["max_completion_tokens"] is not None:
        if opts["max_tokens"] not in (None, opts["max_completion_tokens"]):
            raise ApiError(400, "max_tokens and max_completion_tokens differ: give one",
                           param="max_tokens")
        opts["max_tokens"] = opts["max_completion_tokens"]
    stream_options = opts["stream_options"] or {}
    if stream_options and not opts["stream"]:
        raise ApiError(400, "stream_options needs stream: true", param="stream_options")
    for name in stream_options:
        if name != "include_usage":
            raise ApiError(400, f"stream_options.{name} is not supported",
                           param=f"stream_options.{name}", code="unsupported_parameter")
    opts["include_usage"] = bool(_typed(stream_options, "include_usage", "boolean",
                                        "stream_options."))
    stop = opts["stop"]
    stop = [stop] if isinstance(stop, str) else stop or []
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop is {json.dumps(stop)[:80]}, expected a non-empty string "
                            f"or an array of at most {MAX_STOP} of them", param="stop")
    opts["stop"] = tuple(stop)
    g = server.generation
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed",
                 "max_tokens"):
        if opts[name] is None:
            opts[name] = getattr(g, name)
    if opts["max_tokens"] is None:
        opts["max_tokens"] = default_max_tokens(server.engine.model)
    try:
        _check_options(opts["max_tokens"], opts["temperature"], opts["top_k"], opts["top_p"],
                       opts["min_p"], opts["repetition_penalty"], 1, opts["seed"])
    except ValidationError as err:  # "generate: top_p = 2, expected a number in (0, 1]"
        message = str(err).removeprefix("generate: ")
        raise ApiError(400, message, param=message.split(" = ")[0]) from None
    return opts


def _messages(body: dict) -> list[tuple[str, str]]:
    """(role, text) of a chat request's messages, checked."""
    messages = _typed(body, "messages", "array")
    if not messages:
        raise ApiError(400, "messages is missing or empty, expected an array of messages",
                       param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]."
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] is {_json_kind(message)}, expected an object",
                           param=f"messages[{i}]")
        role, content = _typed(message, "role", "string", where), message.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}role = {role!r} is not supported, expected one of "
                                f"{', '.join(ROLES)}", param=where + "role")
        if isinstance(content, list):  # content parts: text only
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"{where}content[{j}] is not a text part "
                                        f"({{\"type\": \"text\", \"text\": ...}}): only text "
                                        f"is supported", param=f"{where}content[{j}]")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}content is {_json_kind(content)}, expected a "
                                f"string or an array of text parts", param=where + "content")
        out.append((ROLES[role], content))
    return out


def _prompt_ids(server: _Server, body: dict, chat: bool) -> list[int]:
    """The prompt's token ids (of a large body, in a worker thread: see INLINE_TOKENIZE).
    A conversation longer than half the context keeps its latest messages that fit
    in half (at least the last one); a prompt longer than the context is a 400."""
    model = server.engine.model
    T = model.config.max_seq_len
    if chat:
        messages = _messages(body)
        encode = lambda first: model.tokenizer.encode(chat_prompt(model, messages[first:]))
        first = len(messages) - 1  # back from the last message while the prompt fits
        while first > 0 and len(encode(first - 1)) <= T // 2:
            first -= 1
        ids = encode(first)
    else:
        prompt = _typed(body, "prompt", "string or array")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            ids = model.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(_KINDS["integer"](i) for i in prompt):
            V = model.tokenizer.size
            bad = [i for i in prompt if not 0 <= i < V]
            if bad:
                raise ApiError(400, f"prompt holds token id {bad[0]}, expected ids in "
                                    f"[0, {V})", param="prompt")
            ids = list(prompt)
        else:
            raise ApiError(400, "prompt is missing or not a string or an array of token ids "
                                "(one prompt per request)", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty, expected some text", param="prompt")
    if len(ids) > T:
        raise ApiError(400, f"the prompt is {len(ids)} tokens, more than the model's context "
                            f"of {T}", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    return ids


async def _complete(server: _Server, request: Request, chat: bool) -> Response:
    """POST /v1/chat/completions (chat) or /v1/completions: check, queue, answer."""
    server.authorize(request)
    server.available()
    body, size = await _read_json(request)
    opts = _options(server, body, chat)
    ids = (_prompt_ids(server, body, chat) if size <= INLINE_TOKENIZE else
           await run_in_threadpool(_prompt_ids, server, body, chat))
    T = server.engine.model.config.max_seq_len
    job = Job(ids, min(opts["max_tokens"], T - len(ids) + 1),
              {name: opts[name] for name in ("temperature", "top_k", "top_p", "min_p",
                                             "repetition_penalty")},
              opts["seed"], opts["stop"], asyncio.Queue())
    try:
        server.engine.submit(job)
    except QueueFull as err:
        raise ApiError(429, f"{err}: try again shortly", code="queue_full", kind="server_error",
                       headers={"Retry-After": str(RETRY_AFTER)}) from None
    answer = _Answer(server.model_name, chat, job)
    if opts["stream"]:
        return _EventStream(job, answer.chunks(opts["include_usage"]))
    text, reason = await _collect(request, job)
    if reason in ("cancelled", "error"):
        raise ApiError(503 if reason == "cancelled" else 500, f"the request ended early "
                       f"({reason}; the server is {server.status})", kind="server_error")
    return JSONResponse(answer.whole(text, reason))


class _Answer:
    """OpenAI's response bodies of one job: the whole answer, or the stream's chunks."""

    def __init__(self, model_name: str, chat: bool, job: Job) -> None:
        self.chat, self.job, self.model_name = chat, job, model_name
        self.id = ("chatcmpl-" if chat else "cmpl-") + f"{_IDS.getrandbits(96):024x}"
        self.created = int(time.time())

    def _envelope(self, choices: list, chunk: bool) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (
            ".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.model_name, "choices": choices}

    def _usage(self) -> dict:
        prompt, completion = len(self.job.prompt_ids), self.job.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _choice(self, text: str | None, reason: str | None, chunk: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if chunk:
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": reason}

    def whole(self, text: str, reason: str) -> dict:
        """The non-streaming response."""
        return {**self._envelope([self._choice(text, reason, False)], False),
                "usage": self._usage()}

    async def chunks(self, include_usage: bool) -> AsyncIterator[bytes]:
        """The server-sent events: a chunk per piece of text, the finish reason, the usage
        (with include_usage), then [DONE]; an engine error ends the stream with an error
        event. The updates that are waiting go out together (one write under load)."""
        def event(data: dict) -> bytes:
            if include_usage:
                data.setdefault("usage", None)
            return b"data: " + json.dumps(data).encode() + b"\n\n"

        # a text chunk is this event with the text's JSON between its two halves
        head, tail = event(self._envelope([self._choice(_MARK, None, True)], True)).split(
            json.dumps(_MARK).encode())
        if self.chat:  # the first chunk names the role
            first = self._envelope([self._choice(None, None, True)], True)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield event(first)
        inbox, reason = self.job.inbox, None
        while reason is None:
            updates = [await inbox.get()]
            while not inbox.empty():
                updates.append(inbox.get_nowait())
            out = []
            for text, reason in updates:
                if text:
                    out.append(head + json.dumps(text).encode() + tail)
            if reason in ("cancelled", "error"):
                out.append(event(ApiError(500, f"the request ended early ({reason})",
                                          kind="server_error").body()))
                yield b"".join(out)
                return
            if reason is not None:
                out.append(event(self._envelope(
                    [self._choice(None if self.chat else "", reason, True)], True)))
                if include_usage:
                    out.append(event({**self._envelope([], True), "usage": self._usage()}))
                out.append(b"data: [DONE]\n\n")
            yield b"".join(out)


async def _watch_disconnect(receive, job: Job) -> None:
    """Cancel `job` when the client goes away (the engine frees its row within a step)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.cancel()


async def _collect(request: Request, job: Job) -> tuple[str, str]:
    """The whole text of a job and its finish reason."""
    watcher = asyncio.ensure_future(_watch_disconnect(request.receive, job))
    try:
        parts = []
        while True:
            text, reason = await job.inbox.get()
            parts.append(text)
            if reason is not None:
                return "".join(parts), reason
    finally:
        watcher.cancel()
        job.cancel()  # a no-op once it finished; else (a cancelled handler) frees its row


class _EventStream:
    """ASGI response: a job's server-sent events; the job is cancelled as soon as the
    client disconnects (watched apart from the sending, so a stream waiting for its next
    token notices too)."""

    def __init__(self, job: Job, chunks: AsyncIterator[bytes]) -> None:
        self.job, self.chunks = job, chunks

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(_watch_disconnect(receive, self.job))
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            async for chunk in self.chunks:
                if self.job.cancelled:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client left while we sent
            pass
        finally:
            watcher.cancel()
            self.job.cancel()
