"""What every route shares, whatever its wire format: the server's state, the API-key check,
reading a JSON body within limits, error responses in the route's own format (``WireFormat``, which
each route declares with ``endpoint``), metrics, the access log, one answer skeleton for streamed
and whole answers (``stream_or_collect``), and reading engine requests to their end when the
client may go away."""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import json
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .._exceptions import MullamaError
from ..generate._async import submit_in_thread
from ..generate._engine import EngineRequest
from ..generate._media import MediaLimits
from ..generate._sequence import Token
from ._request import APIError, generation_error
from ._response_store import ConversationStore, ResponseStore
from ._workers import GENERATION, Workers

if TYPE_CHECKING:
    from ._pool import Lease, ModelPool

T = TypeVar("T")
SSE = "text/event-stream"
TOKENS_KEY = "mullama.tokens"  # where a route leaves the number of tokens it generated, for the access log
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit on inputs per request


@dataclass
class ServerSettings:
    model_name: str = ""  # the name of the one model a single-model server answers with
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    max_prompt_chars: int = 4 << 20  # the rendered prompt (template included), before tokenising
    pooling: str | None = None  # for embeddings: None is the model's own (mean for generative models)
    embedding_batch: int | None = None  # tokens per embedding decode, and the longest input (default 512)
    max_embedding_inputs: int = MAX_EMBEDDING_INPUTS
    slot_save_path: Path | None = None  # the directory of /slots save and restore (None: refused)
    # Images and audio in requests: no local files (unless --media-path), no remote URLs (unless allowed).
    media: MediaLimits = field(default_factory=lambda: MediaLimits(allow_files=False))


class Metrics:
    def __init__(self) -> None:
        self.http_requests: dict[int, int] = {}
        self.recent: list[tuple[float, int]] = []  # (time, tokens) of finished requests, for tokens/s
        self.embedding_requests = 0  # embedding and rerank requests waiting for their decodes or in them
        self.embedding_running = 0  # ... of which on a worker thread now
        self.embedding_cancelled = 0  # ... stopped before their end: their client went away
        self.embedding_lock = threading.Lock()  # worker threads count the last two

    def count(self, status: int) -> None:
        self.http_requests[status] = self.http_requests.get(status, 0) + 1

    def finished(self, tokens: int) -> None:
        now = time.monotonic()
        self.recent.append((now, tokens))
        self.recent = [(t, n) for t, n in self.recent if now - t < 60]


@dataclass
class ServerState:
    """Everything the routes share; the app keeps it as ``app.state.mullama``."""

    settings: ServerSettings
    pool: ModelPool
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))
    responses: ResponseStore = field(default_factory=ResponseStore)  # the Responses API's stored responses
    conversations: ConversationStore = field(default_factory=ConversationStore)  # and its conversations
    draining: bool = False  # SIGTERM: streams in flight finish, new requests are refused (503: retry elsewhere)

    def authorized(self, headers: Any) -> bool:
        """``Authorization: Bearer KEY`` or ``x-api-key: KEY`` matches the server's key (if it has one)."""
        key = self.settings.api_key
        if not key:
            return True
        supplied = headers.get("x-api-key") or ""
        auth = headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            supplied = auth[7:].strip()
        return bool(supplied) and hmac.compare_digest(supplied.encode(), key.encode())

    def finished(self, scope: MutableMapping[str, Any], tokens: int) -> None:
        """A generation ended: its tokens count in the metrics and its access-log line."""
        self.metrics.finished(tokens)
        scope[TOKENS_KEY] = tokens


def state(request: Request) -> ServerState:
    return request.app.state.mullama


Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class WireFormat:
    """What a wire format answers in its own shape whatever the route: a refused request's error body,
    the event that ends its stream on an error, and the media type of its streams. Each format
    declares one; each route declares its format (``endpoint``, ``speaks``)."""

    error_body: Callable[[APIError], dict]
    error_event: Callable[[APIError], str]
    media_type: str = SSE


_DECLARED: dict[Callable[..., Any], WireFormat] = {}  # route handler -> the format it answers in


def speaks(fmt: WireFormat) -> Callable[[Handler], Handler]:
    """Declare the wire format a route answers in (``endpoint`` does it for its routes)."""
    def declare(handler: Handler) -> Handler:
        _DECLARED[handler] = fmt
        return handler
    return declare


def declared_format(handler: Callable[..., Any]) -> WireFormat | None:
    """The wire format a route's handler was declared with (None: it declared none)."""
    return _DECLARED.get(handler)


def endpoint(fmt: WireFormat) -> Callable[[Handler], Handler]:
    """A route of one wire format: the API key is checked first; an APIError (or a MullamaError, such
    as a model that fails to load) is answered in ``fmt``'s error body; every answer counts in the
    metrics."""
    shape = fmt.error_body

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def route(request: Request) -> Response:
            server = state(request)
            try:
                if server.draining:
                    raise APIError(503, "the server is shutting down; retry the request (on another replica).",
                                   type="server_error", code="shutting_down")
                if not server.authorized(request.headers):
                    raise APIError(401, "missing or wrong API key: send Authorization: Bearer <key> (or x-api-key).",
                                   type="authentication_error", code="invalid_api_key")
                response = await handler(request)
            except APIError as exc:
                response = JSONResponse(shape(exc), status_code=exc.status)
            except MullamaError as exc:
                problem = generation_error(exc)
                response = JSONResponse(shape(problem), status_code=problem.status)
            server.metrics.count(response.status_code)
            return response
        return speaks(fmt)(route)
    return wrap


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_json(body: bytes | bytearray | str) -> Any:
    """A request's JSON; any failure (nesting too deep included) is a 400 APIError."""
    try:
        return json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}.") from None


async def read_json(request: Request) -> Any:
    """The request's JSON body, at most ``max_body_bytes``, whatever its Content-Type: LiteLLM's
    ollama providers send none, and ollama and llama-server read such bodies as JSON too. A body that
    is not JSON is a 400 all the same."""
    limit = state(request).settings.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise APIError(413, f"the request body is larger than {limit} bytes.")
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"the request body is larger than {limit} bytes.")
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the body.") from None
    return parse_json(body)


# Starlette's JSONResponse encoding, in the pure-Python encoder's pieces (see json_answer).
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


async def json_answer(build: Callable[[], Any], status: int = 200, *, workers: Workers = GENERATION) -> Response:
    """The JSON answer ``build()`` returns, built and encoded on one of ``workers``' threads, in pieces: a
    large one (logprobs of many tokens and choices, thousands of embeddings) never holds up the event
    loop — json's C encoder would hold the GIL for the whole text; its pure-Python one, which
    ``iterencode`` uses, lets the loop run between pieces."""
    def work() -> bytes:
        return "".join(_ENCODER.iterencode(build())).encode("utf-8")

    return Response(await workers.run(work), status_code=status, media_type="application/json")


async def stream_or_collect(request: Request, fmt: WireFormat, lease: Lease, jobs: list[EngineRequest], *,
                            stream: bool, events: Callable[[], AsyncGenerator[str, None]],
                            collect: Callable[[], Awaitable[T]], answer: Callable[[T], Any]) -> Response:
    """The answer to a generation request whose ``jobs`` run on ``lease``'s model, in ``fmt``.

    Streamed: ``events()``, the format's events as the tokens come (its own error event, and
    ``ServerState.finished`` at its end, included), holding the lease until the stream ends (server-sent
    events uncached and unbuffered by a proxy in between). Whole: ``collect()`` reads the jobs to their
    end (they stop if the client goes away) while the lease is held, then ``answer(collected)`` is the
    JSON body, built and encoded in a worker thread."""
    if stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"} if fmt.media_type == SSE else None
        return StreamingResponse(lease.until_closed(events()), media_type=fmt.media_type, headers=headers)
    async with lease:
        collected = await run_to_end(request, jobs, collect())
    state(request).finished(request.scope, sum(job.completion_tokens for job in jobs))
    return await json_answer(lambda: answer(collected))


async def read_object(request: Request) -> dict:
    """The request's JSON body, which must be an object."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object.")
    return body


def named_model(request: Request, body: Any) -> str | None:
    """The model a llama-server-style management route names: ``?model=``, else the body's
    ``model`` string (none: the server's only or default model)."""
    name = request.query_params.get("model")
    if name is None and isinstance(body, dict) and isinstance(body.get("model"), str):
        name = body["model"]
    return name


def requested_model(body: Any) -> str | None:
    """The body's ``model`` (ollama's clients may send ``name``), checked to be a string."""
    if not isinstance(body, dict):
        return None
    name = body.get("model", body.get("name"))
    if name is not None and not isinstance(name, str):
        raise APIError(400, "'model' must be a string.", param="model")
    return name or None


async def _on_disconnect(request: Request, stop: Callable[[], object]) -> None:
    """``stop()`` when the HTTP client goes away (its body is read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stop()
            return


async def until_disconnect(request: Request, work: Awaitable[T], stop: Callable[[], object]) -> T:
    """Await ``work`` for a client that waits for a whole answer: when it goes away nobody will read
    the answer, so ``stop()`` then; and afterwards in any case (a no-op once the work is done), so
    that work abandoned by a cancelled task (a shutdown) stops too."""
    watcher = asyncio.create_task(_on_disconnect(request, stop))
    try:
        return await work
    finally:
        watcher.cancel()
        stop()


async def run_to_end(request: Request, jobs: list[EngineRequest], work: Awaitable[T]) -> T:
    """Await ``work``, which reads ``jobs`` to their end; the jobs are cancelled when the client goes
    away (see until_disconnect). A job's MullamaError propagates."""
    def cancel_all() -> None:
        for job in jobs:
            job.cancel()

    return await until_disconnect(request, work, cancel_all)


async def drain(job: EngineRequest) -> list[Token]:
    """Read ``job`` to its end: its tokens (its text and statistics stay on it too)."""
    tokens = []
    while (token := await job.next_token()) is not None:
        tokens.append(token)
    return tokens


async def submit_in_all(start: Callable[[], list[EngineRequest]]) -> list[EngineRequest]:
    """``start()`` on a generation worker thread (see submit_in_thread), for several sequences at once."""
    def cancel_all(jobs: list[EngineRequest]) -> None:
        for job in jobs:
            job.cancel()

    return await submit_in_thread(start, cancel_all, run_in=GENERATION.run)


async def merged(jobs: list[EngineRequest]) -> AsyncIterator[tuple[int, Token | MullamaError | None]]:
    """Tokens of several sequences as they come: (choice index, token); None ends a choice, an error
    ends them all."""
    if len(jobs) == 1:  # the common case, without tasks
        while True:
            try:
                token = await jobs[0].next_token()
            except MullamaError as exc:
                yield 0, exc
                return
            yield 0, token
            if token is None:
                return
    queue: asyncio.Queue[tuple[int, Token | MullamaError | None]] = asyncio.Queue()

    async def pump(index: int, job: EngineRequest) -> None:
        try:
            while (token := await job.next_token()) is not None:
                await queue.put((index, token))
            await queue.put((index, None))
        except MullamaError as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        open_choices = len(jobs)
        while open_choices:
            index, item = await queue.get()
            yield index, item
            if isinstance(item, MullamaError):
                return
            if item is None:
                open_choices -= 1
    finally:
        for task in tasks:
            task.cancel()


class AccessLog:
    """ASGI middleware: one line per HTTP request on standard error, when its response ends:
    client, method, path, status, generated tokens (when the route reports them), milliseconds."""

    def __init__(self, app: Any, stream: Any = None) -> None:
        self.app = app
        self.stream = stream

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0
        logged = False
        scope[TOKENS_KEY] = None

        def log() -> None:
            nonlocal logged
            logged = True
            tokens = scope.get(TOKENS_KEY)
            client = (scope.get("client") or ("-",))[0]
            print(f"{client} {scope['method']} {scope['path']} {status or '-'}"
                  f"{f' {tokens} tokens' if tokens is not None else ''} "
                  f"{(time.perf_counter() - started) * 1000:.0f} ms", file=self.stream or sys.stderr, flush=True)

        async def logging_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not logged:
                log()

        try:
            await self.app(scope, receive, logging_send)
        finally:
            if not logged:  # the client went away before the end
                log()
