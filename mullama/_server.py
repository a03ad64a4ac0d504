"""``mullama serve``: an OpenAI-compatible streaming server over the batching engine.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (SSE when ``stream``),
``POST /v1/embeddings``, Anthropic's ``POST /v1/messages`` (and ``/v1/messages/count_tokens``),
ollama's ``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``,
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text) and the
WebSocket ``/v1/ws``. Safe by default: it binds 127.0.0.1, refuses a non-loopback
address without an API key, checks ``Authorization: Bearer`` / ``x-api-key`` on every
route but ``/health``, bounds request bodies and ``max_tokens``, and never opens a
path a request names (the ``model`` field is informational).

Needs the ``server`` extra (starlette, uvicorn).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import ipaddress
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from . import _anthropic, _ollama, _openai
from ._async import submit_in_thread
from ._config import StreamConfig
from ._context_params import ContextSettings
from ._engine import Engine, EngineRequest
from ._exceptions import (
    ContextOverflowError,
    EngineError,
    InvalidConfigError,
    MullamaError,
    QueueFullError,
    TemplateError,
    TokenizeError,
)
from ._model import Model
from ._openai import APIError
from ._sequence import Token
from ._tools import chat_prompt

__all__ = ["AccessLog", "ServerSettings", "create_app", "is_loopback"]

T = TypeVar("T")
TOKENS_KEY = "mullama.tokens"  # where a route leaves the number of tokens it generated, for the access log


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    max_prompt_chars: int = 4 << 20  # the rendered prompt (template included), before tokenising
    pooling: str | None = None  # for /v1/embeddings: None is the model's own (mean for generative models)
    embedding_batch: int | None = None  # tokens per embedding decode, and the longest input (default 512)
    max_embedding_inputs: int = _openai.MAX_EMBEDDING_INPUTS


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Metrics:
    def __init__(self) -> None:
        self.http_requests: dict[int, int] = {}
        self.recent: list[tuple[float, int]] = []  # (time, tokens) of finished requests, for tokens/s

    def count(self, status: int) -> None:
        self.http_requests[status] = self.http_requests.get(status, 0) + 1

    def finished(self, tokens: int) -> None:
        now = time.monotonic()
        self.recent.append((now, tokens))
        self.recent = [(t, n) for t, n in self.recent if now - t < 60]


def parse_json(body: bytes | bytearray | str) -> Any:
    """A request's JSON; any failure (nesting too deep included) is a 400 APIError."""
    try:
        return json.loads(body)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: nested too deeply.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}.") from None


async def _cancel_on_disconnect(request: Request, jobs: list[EngineRequest]) -> None:
    """Cancel ``jobs`` when the HTTP client goes away (its body is read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for job in jobs:
                job.cancel()
            return


async def run_to_end(request: Request, jobs: list[EngineRequest], work: Awaitable[T]) -> T:
    """Await ``work``, which reads ``jobs`` to their end: nobody reads a non-streamed answer once its
    client is gone, so the jobs stop then too; afterwards every job is cancelled (a no-op once finished).
    A job's MullamaError propagates."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, jobs))
    try:
        return await work
    finally:
        watcher.cancel()
        for job in jobs:
            job.cancel()


async def drain(job: EngineRequest) -> None:
    """Read ``job`` to its end (its text and statistics stay on it)."""
    while await job.next_token() is not None:
        pass


async def submit_in_all(start: Callable[[], list[EngineRequest]]) -> list[EngineRequest]:
    """``start()`` in a worker thread (see submit_in_thread), for several sequences at once."""
    def cancel_all(jobs: list[EngineRequest]) -> None:
        for job in jobs:
            job.cancel()

    return await submit_in_thread(start, cancel_all)


async def _merged(jobs: list[EngineRequest]) -> AsyncIterator[tuple[int, Token | MullamaError | None]]:
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


def create_app(model: Model, engine: Engine | None, settings: ServerSettings) -> Starlette:
    """The ASGI application serving ``model`` through ``engine`` (None for an embedding model, which
    answers ``/v1/embeddings`` only)."""
    metrics = _Metrics()
    model_name = settings.model_name
    created = int(time.time())

    def authorized(headers) -> bool:
        if not settings.api_key:
            return True
        supplied = headers.get("x-api-key") or ""
        auth = headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            supplied = auth[7:].strip()
        return bool(supplied) and hmac.compare_digest(supplied.encode(), settings.api_key.encode())

    def finished(scope: MutableMapping[str, Any], tokens: int) -> None:
        """A generation ended: its tokens count in the metrics and its access-log line."""
        metrics.finished(tokens)
        scope[TOKENS_KEY] = tokens

    def error(exc: APIError) -> JSONResponse:
        metrics.count(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def read_json(request: Request) -> Any:
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise APIError(415, "send the request body as JSON with Content-Type: application/json.")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            raise APIError(413, f"the request body is larger than {settings.max_body_bytes} bytes.")
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > settings.max_body_bytes:
                    raise APIError(413, f"the request body is larger than {settings.max_body_bytes} bytes.")
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the body.") from None
        return parse_json(body)

    def prompt_tokens(parsed: _openai.ParsedRequest) -> tuple[list[int], StreamConfig]:
        """The request's prompt, rendered (with its tools) and tokenised, and the config to generate it
        with (CPU work: called in a worker thread)."""
        param = "messages" if parsed.kind == "chat" else "prompt"
        try:
            config = parsed.config
            if parsed.messages is not None:
                text, config = chat_prompt(model, parsed.messages, config, tools=parsed.tools,
                                           tool_choice=parsed.tool_choice,
                                           parallel_tool_calls=parsed.parallel_tool_calls,
                                           chat_template=None, chat_template_kwargs=None,
                                           reasoning_format=parsed.reasoning_format)
            else:
                text = parsed.prompt or ""
            if len(text) > settings.max_prompt_chars:
                raise APIError(413, f"the prompt is {len(text)} characters long once rendered; the limit is "
                                    f"{settings.max_prompt_chars}.", param=param)
            return model.tokenize(text, add_special=True, parse_special=True), config
        except (TemplateError, TokenizeError, InvalidConfigError) as exc:
            tools_problem = parsed.tools and ("tool" in str(exc) or "grammar" in str(exc))
            raise APIError(400, str(exc), param="tools" if tools_problem else param) from None

    def prepare(parsed: _openai.ParsedRequest) -> list[EngineRequest]:
        """Render and tokenise ``parsed``, then submit one sequence per choice (in a worker thread:
        the event loop stays free). If one cannot be queued, none is."""
        if engine is None:
            raise APIError(400, f"{model_name} is an embedding model: it answers /v1/embeddings only.",
                           code="model_not_generative")
        tokens, config = prompt_tokens(parsed)
        jobs: list[EngineRequest] = []
        try:
            for choice_config in parsed.choice_configs(config):
                jobs.append(submit(tokens, choice_config))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return jobs

    def submit(tokens: list[int], config: StreamConfig) -> EngineRequest:
        assert engine is not None  # prepare() refuses first
        try:
            return engine.submit(tokens, config)
        except QueueFullError as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from None
        except ContextOverflowError as exc:
            raise APIError(400, str(exc), code="context_length_exceeded") from None
        except EngineError as exc:
            raise APIError(503, str(exc), type="server_error", code="engine_failed") from None
        except InvalidConfigError as exc:
            raise APIError(400, str(exc)) from None

    async def generate(request: Request, kind: str) -> Response:
        if not authorized(request.headers):
            return error(APIError(401, "missing or wrong API key: send Authorization: Bearer <key>.",
                                  type="authentication_error", code="invalid_api_key"))
        try:
            body = await read_json(request)
            parsed = _openai.parse_request(body, kind, max_tokens_limit=settings.max_tokens_limit)
            jobs = await submit_in_all(lambda: prepare(parsed))
        except APIError as exc:
            return error(exc)
        request_id = _openai.new_id(kind)
        n_prompt = jobs[0].prompt_tokens
        if parsed.stream:
            metrics.count(200)
            return StreamingResponse(sse(jobs, parsed, kind, request_id, n_prompt, request.scope),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            choices = await run_to_end(request, jobs, asyncio.gather(*(collect(job, kind) for job in jobs)))
        except MullamaError as exc:
            return error(_openai.generation_error(exc))
        completion_tokens = sum(job.completion_tokens for job in jobs)
        metrics.count(200)
        finished(request.scope, completion_tokens)
        return JSONResponse(_openai.completion_body(kind, request_id, model_name, choices, n_prompt,
                                                    completion_tokens))

    async def collect(job: EngineRequest, kind: str) -> _openai.Choice:
        tokens = []
        while (token := await job.next_token()) is not None:
            tokens.append(token)
        calls = [call.to_openai() for call in job.tool_calls] or None
        return _openai.Choice(job.text, job.finish_reason or "stop",
                              _openai.logprobs_body(kind, tokens, model._cached_piece), calls, job.reasoning or None)

    async def sse(jobs: list[EngineRequest], parsed, kind: str, request_id: str,
                  n_prompt: int, scope: MutableMapping[str, Any]) -> AsyncIterator[str]:
        stamp = int(time.time())

        def event(payload: dict) -> str:
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        try:
            if kind == "chat":
                for index in range(len(jobs)):
                    yield event(_openai.chunk(kind, request_id, model_name, stamp, role=True, index=index))
            pending: list[list[Token]] = [[] for _ in jobs]  # tokens whose text is not out yet, per choice
            calls = [_openai.ToolCallDeltas() for _ in jobs]
            async for index, token in _merged(jobs):
                if isinstance(token, MullamaError):
                    yield event(_openai.error_body(str(token), type="server_error", code=token.code.lower()))
                    return
                if token is None:
                    yield event(_openai.chunk(kind, request_id, model_name, stamp, index=index,
                                              finish_reason=jobs[index].finish_reason))
                    continue
                parser = jobs[index]._sequence.tools
                if parser is not None:
                    for delta in calls[index].after(parser):
                        yield event(_openai.chunk(kind, request_id, model_name, stamp, index=index, tool_call=delta))
                if token.kind == "reasoning":
                    yield event(_openai.chunk(kind, request_id, model_name, stamp, index=index, reasoning=token.text))
                    continue
                pending[index].append(token)
                if token.text:
                    logprobs = _openai.logprobs_body(kind, pending[index], model._cached_piece)
                    yield event(_openai.chunk(kind, request_id, model_name, stamp, text=token.text,
                                              logprobs=logprobs, index=index))
                    pending[index] = []
            completion_tokens = sum(job.completion_tokens for job in jobs)
            if parsed.include_usage:
                yield event(_openai.usage_chunk(kind, request_id, model_name, stamp, n_prompt, completion_tokens))
            yield "data: [DONE]\n\n"
            finished(scope, completion_tokens)
        finally:  # the client went away, or we are done: either way the sequences stop now
            for job in jobs:
                job.cancel()

    def embed(parsed: _openai.EmbeddingRequest) -> tuple[list[list[float]], int]:
        """The request's vectors and its token count (in a worker thread; concurrent requests share decodes)."""
        try:
            if parsed.dimensions is not None and parsed.dimensions != model.n_embd:
                raise APIError(400, f"this model's embeddings have {model.n_embd} dimensions and cannot be "
                                    "shortened; leave 'dimensions' out.", param="dimensions")
            if parsed.texts is not None:
                token_lists = [model.tokenize(text, add_special=True, parse_special=True) for text in parsed.texts]
            else:
                token_lists = parsed.token_lists or []
            vectors = model.embed(token_lists, pooling=settings.pooling, batch_size=settings.embedding_batch)
            return vectors, sum(map(len, token_lists))
        except ContextOverflowError as exc:
            raise APIError(400, str(exc).replace("text ", "input item ", 1), param="input",
                           code="context_length_exceeded") from None
        except (InvalidConfigError, TokenizeError) as exc:
            raise APIError(400, str(exc).replace("text ", "input item ", 1), param="input") from None
        except MullamaError as exc:
            raise _openai.generation_error(exc) from None

    async def embeddings(request: Request) -> Response:
        if not authorized(request.headers):
            return error(APIError(401, "missing or wrong API key: send Authorization: Bearer <key>.",
                                  type="authentication_error", code="invalid_api_key"))
        try:
            body = await read_json(request)
            parsed = _openai.parse_embedding_request(body, max_inputs=settings.max_embedding_inputs)
            vectors, n_tokens = await asyncio.to_thread(embed, parsed)
        except APIError as exc:
            return error(exc)
        metrics.count(200)
        return JSONResponse(_openai.embedding_body(vectors, model_name, n_tokens, base64=parsed.base64))

    def anthropic_error(exc: APIError) -> JSONResponse:
        metrics.count(exc.status)
        return JSONResponse(_anthropic.error_body(exc), status_code=exc.status)

    async def messages(request: Request) -> Response:
        """Anthropic's Messages API over the same engine (see mullama._anthropic)."""
        if not authorized(request.headers):
            return anthropic_error(APIError(401, "missing or wrong API key: send x-api-key."))
        try:
            body = await read_json(request)
            parsed = _anthropic.parse_request(body, max_tokens_limit=settings.max_tokens_limit)
            (job,) = await submit_in_all(lambda: prepare(parsed))
        except APIError as exc:
            return anthropic_error(exc)
        message_id = _anthropic.new_id()
        if parsed.stream:
            metrics.count(200)
            return StreamingResponse(anthropic_events(job, message_id, request.scope), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await run_to_end(request, [job], drain(job))
        except MullamaError as exc:
            return anthropic_error(_openai.generation_error(exc))
        metrics.count(200)
        finished(request.scope, job.completion_tokens)
        return JSONResponse(_anthropic.message_body(message_id, model_name, job.text, job.tool_calls,
                                                    job.finish_reason, job.stop_sequence, job.prompt_tokens,
                                                    job.completion_tokens))

    async def anthropic_events(job: EngineRequest, message_id: str, scope: MutableMapping[str, Any]
                               ) -> AsyncIterator[str]:
        event = _anthropic.event
        yield event("message_start", {"message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model_name, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": job.prompt_tokens, "output_tokens": 0}}})
        index, open_kind = -1, None
        calls = _openai.ToolCallDeltas()

        def start(kind: str, block: dict) -> list[str]:
            nonlocal index, open_kind
            events: list[str] = [event("content_block_stop", {"index": index})] if open_kind else []
            index, open_kind = index + 1, kind
            return [*events, event("content_block_start", {"index": index, "content_block": block})]

        try:
            while (token := await job.next_token()) is not None:
                parser = job._sequence.tools
                for delta in calls.after(parser) if parser is not None else []:
                    if "id" in delta:
                        for item in start("tool_use", {"type": "tool_use", "id": delta["id"],
                                                       "name": delta["function"]["name"], "input": {}}):
                            yield item
                    if delta["function"].get("arguments"):
                        yield event("content_block_delta", {"index": index, "delta": {
                            "type": "input_json_delta", "partial_json": delta["function"]["arguments"]}})
                if not token.text:
                    continue
                kind = "thinking" if token.kind == "reasoning" else "text"
                if open_kind != kind:
                    for item in start(kind, {"type": kind, kind: ""}):
                        yield item
                yield event("content_block_delta", {"index": index, "delta": {"type": f"{kind}_delta",
                                                                              kind: token.text}})
        except MullamaError as exc:
            yield event("error", {"error": {"type": "api_error", "message": str(exc)}})
            return
        finally:
            job.cancel()
        if open_kind is None:
            for item in start("text", {"type": "text", "text": ""}):
                yield item
        yield event("content_block_stop", {"index": index})
        finished(scope, job.completion_tokens)
        yield event("message_delta", {
            "delta": {"stop_reason": _anthropic.stop_reason(job.finish_reason, job.stop_sequence),
                      "stop_sequence": job.stop_sequence},
            "usage": {"output_tokens": job.completion_tokens}})
        yield event("message_stop", {})

    async def count_tokens(request: Request) -> Response:
        if not authorized(request.headers):
            return anthropic_error(APIError(401, "missing or wrong API key: send x-api-key."))
        try:
            parsed = _anthropic.to_count_request(await read_json(request))
            tokens, _ = await asyncio.to_thread(prompt_tokens, parsed)
        except APIError as exc:
            return anthropic_error(exc)
        metrics.count(200)
        return JSONResponse({"input_tokens": len(tokens)})

    # --- ollama's API (see mullama._ollama) -------------------------------------------------------
    def ollama_error(exc: APIError) -> JSONResponse:
        metrics.count(exc.status)
        return JSONResponse(_ollama.error_body(exc), status_code=exc.status)

    async def ollama_generation(request: Request, kind: str) -> Response:
        if not authorized(request.headers):
            return ollama_error(APIError(401, "missing or wrong API key."))
        started = time.perf_counter()
        try:
            body = await read_json(request)
            parse = _ollama.parse_chat if kind == "chat" else _ollama.parse_generate
            parsed = parse(body, max_tokens_limit=settings.max_tokens_limit)
            (job,) = await submit_in_all(lambda: prepare(parsed))
        except APIError as exc:
            return ollama_error(exc)
        name = body.get("model") if isinstance(body.get("model"), str) and body.get("model") else model_name
        metrics.count(200)
        if parsed.stream:
            return StreamingResponse(ollama_lines(job, kind, name, started, request.scope),
                                     media_type="application/x-ndjson")
        try:
            await run_to_end(request, [job], drain(job))
        except MullamaError as exc:
            return ollama_error(_openai.generation_error(exc))
        finished(request.scope, job.completion_tokens)
        return JSONResponse(_ollama.done_line(kind, name, job, started, job.text, job.tool_calls))

    async def ollama_lines(job: EngineRequest, kind: str, name: str, started: float,
                           scope: MutableMapping[str, Any]) -> AsyncIterator[str]:
        try:
            while (token := await job.next_token()) is not None:
                if token.text and token.kind == "content":
                    yield json.dumps(_ollama.chat_line(kind, name, token.text), ensure_ascii=False) + "\n"
        except MullamaError as exc:
            yield json.dumps({"error": str(exc)}) + "\n"
            return
        finally:
            job.cancel()
        finished(scope, job.completion_tokens)
        yield json.dumps(_ollama.done_line(kind, name, job, started, "", job.tool_calls), ensure_ascii=False) + "\n"

    async def ollama_chat(request: Request) -> Response:
        return await ollama_generation(request, "chat")

    async def ollama_generate(request: Request) -> Response:
        return await ollama_generation(request, "generate")

    info_cache: list[dict] = []

    def model_details() -> dict:
        """What ollama's model listings say of the served model (read once from its GGUF header)."""
        if not info_cache:
            from ._gguf import read_gguf_info

            info = read_gguf_info(model.path)
            info_cache.append({
                "name": model_name, "model": model_name, "size": model.path.stat().st_size, "digest": "",
                "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(model.path.stat().st_mtime)),
                "details": {"parent_model": "", "format": "gguf", "family": info.architecture,
                            "families": [info.architecture], "parameter_size": f"{info.n_params / 1e6:.0f}M",
                            "quantization_level": info.quantization}})
        return dict(info_cache[0])

    async def ollama_tags(request: Request) -> Response:
        if not authorized(request.headers):
            return ollama_error(APIError(401, "missing or wrong API key."))
        return JSONResponse({"models": [await asyncio.to_thread(model_details)]})

    async def ollama_ps(request: Request) -> Response:
        if not authorized(request.headers):
            return ollama_error(APIError(401, "missing or wrong API key."))
        details = await asyncio.to_thread(model_details)
        return JSONResponse({"models": [{**details, "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0}]})

    async def ollama_show(request: Request) -> Response:
        if not authorized(request.headers):
            return ollama_error(APIError(401, "missing or wrong API key."))
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object with a model.")
        except APIError as exc:
            return ollama_error(exc)
        details = await asyncio.to_thread(model_details)
        metadata = await asyncio.to_thread(lambda: model.metadata)
        return JSONResponse({"modelfile": f"FROM {model.path}\n", "parameters": "",
                             "template": model.chat_template or "", "details": details["details"],
                             "model_info": metadata,
                             "modified_at": details["modified_at"], "capabilities": ["completion"]})

    async def ollama_version(request: Request) -> Response:
        return JSONResponse({"version": _ollama.VERSION})

    async def ollama_embed(request: Request) -> Response:
        if not authorized(request.headers):
            return ollama_error(APIError(401, "missing or wrong API key."))
        started = time.perf_counter()
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object.")
            parsed = _openai.parse_embedding_request({"input": body.get("input")},
                                                     max_inputs=settings.max_embedding_inputs)
            vectors, n_tokens = await asyncio.to_thread(embed, parsed)
        except APIError as exc:
            return ollama_error(exc)
        metrics.count(200)
        return JSONResponse({"model": body.get("model") or model_name, "embeddings": vectors,
                             "total_duration": int((time.perf_counter() - started) * 1e9), "load_duration": 0,
                             "prompt_eval_count": n_tokens})

    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    async def models(request: Request) -> Response:
        if not authorized(request.headers):
            return error(APIError(401, "missing or wrong API key.", type="authentication_error"))
        metrics.count(200)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "mullama"}]})

    async def health(request: Request) -> Response:
        if engine is None:
            return JSONResponse({"status": "ok", "active_streams": 0, "waiting": 0})
        if not engine.alive:
            reason = repr(engine.failure) if engine.failure is not None else "the engine is stopped"
            return JSONResponse({"status": "error", "error": reason}, status_code=503)
        return JSONResponse({"status": "ok", "active_streams": engine.active_streams, "waiting": engine.waiting})

    async def prometheus(request: Request) -> Response:
        if not authorized(request.headers):
            return error(APIError(401, "missing or wrong API key.", type="authentication_error"))
        stats = engine.stats if engine is not None else collections.Counter()
        recent = sum(n for _, n in metrics.recent) / 60.0
        decode_tps = (stats["completion_tokens_total"] / stats["decode_seconds"]) if stats["decode_seconds"] else 0.0
        lines = [
            ("mullama_requests_total", "counter", "Generation requests accepted.", stats["requests_total"]),
            ("mullama_requests_finished_total", "counter", "Requests that ran to the end.", stats["requests_finished"]),
            ("mullama_requests_cancelled_total", "counter", "Requests cancelled (disconnects).",
             stats["requests_cancelled"]),
            ("mullama_requests_failed_total", "counter", "Requests that failed.", stats["requests_failed"]),
            ("mullama_requests_rejected_total", "counter", "Requests refused: queue full.", stats["rejected_total"]),
            ("mullama_prompt_tokens_total", "counter", "Prompt tokens received.", stats["prompt_tokens_total"]),
            ("mullama_tokens_generated_total", "counter", "Tokens generated.", stats["completion_tokens_total"]),
            ("mullama_active_streams", "gauge", "Streams being generated now.", engine.active_streams if engine else 0),
            ("mullama_waiting_requests", "gauge", "Requests waiting for a slot.", engine.waiting if engine else 0),
            ("mullama_tokens_per_second", "gauge", "Tokens/s over the last minute.", round(recent, 3)),
            ("mullama_decode_tokens_per_second", "gauge", "Generated tokens per second of decoding.",
             round(decode_tps, 3)),
        ]
        text = "".join(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name} {value}\n"
                       for name, kind, help_, value in lines)
        text += "# HELP mullama_http_responses_total HTTP responses by status.\n"
        text += "# TYPE mullama_http_responses_total counter\n"
        text += "".join(f'mullama_http_responses_total{{status="{status}"}} {count}\n'
                        for status, count in sorted(metrics.http_requests.items()))
        metrics.count(200)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def websocket(ws: WebSocket) -> None:
        if not authorized(ws.headers):
            await ws.close(code=1008, reason="missing or wrong API key")
            return
        await ws.accept()
        current: asyncio.Task | None = None
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if message.get("text") is None:  # a binary frame: not this protocol
                    await ws.close(code=1003, reason="send JSON in text frames")
                    break
                try:
                    data = parse_json(message["text"])
                except APIError as exc:
                    await ws.send_json({"type": "error", "status": 400, **exc.body()})
                    continue
                if isinstance(data, dict) and data.get("type") == "cancel":
                    if current is not None and not current.done():
                        current.cancel()
                    continue
                if current is not None and not current.done():
                    await ws.send_json({"type": "error", "error": {
                        "message": "a request is still streaming; send {\"type\": \"cancel\"} first."}})
                    continue
                current = asyncio.create_task(ws_stream(ws, data))
        except WebSocketDisconnect:
            pass
        finally:
            if current is not None and not current.done():
                current.cancel()

    async def ws_stream(ws: WebSocket, data: Any) -> None:
        job = None
        try:
            if not isinstance(data, dict):
                raise APIError(400, "send a JSON object with 'prompt' or 'messages'.")
            data = {k: v for k, v in data.items() if k != "type"}
            kind = "chat" if "messages" in data else "completion"
            data.pop("stream", None)
            parsed = _openai.parse_request(data, kind, max_tokens_limit=settings.max_tokens_limit)
            if parsed.n != 1:
                raise APIError(400, "the WebSocket streams one choice: send n = 1.", param="n")
            job = (await submit_in_all(lambda: prepare(parsed)))[0]
            while True:
                token = await job.next_token()
                if token is None:
                    break
                await ws.send_json({"type": "token", "text": token.text, "id": token.id})
            await ws.send_json({"type": "done", "finish_reason": job.finish_reason,
                                "usage": _openai.usage(job.prompt_tokens, job.completion_tokens)})
            metrics.finished(job.completion_tokens)
        except APIError as exc:
            await ws.send_json({"type": "error", "status": exc.status, **exc.body()})
        except MullamaError as exc:
            await ws.send_json({"type": "error", **_openai.error_body(str(exc), type="server_error",
                                                                       code=exc.code.lower())})
        except asyncio.CancelledError:
            if job is not None:
                job.cancel()
            with contextlib.suppress(Exception):
                await ws.send_json({"type": "cancelled"})
            raise
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            if job is not None:
                job.cancel()

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/api/chat", ollama_chat, methods=["POST"]),
        Route("/api/generate", ollama_generate, methods=["POST"]),
        Route("/api/embed", ollama_embed, methods=["POST"]),
        Route("/api/tags", ollama_tags, methods=["GET"]),
        Route("/api/ps", ollama_ps, methods=["GET"]),
        Route("/api/show", ollama_show, methods=["POST"]),
        Route("/api/version", ollama_version, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
        WebSocketRoute("/v1/ws", websocket),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        metrics.count(status)
        return JSONResponse(_openai.error_body(f"{request.method} {request.url.path}: "
                                               f"{'no such route' if status == 404 else 'method not allowed'}."),
                            status_code=status)

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on before the model is loaded (not after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InvalidConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); pass --port with a free "
                                     "port, or stop what uses this one.") from None


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


def serve(model_ref: str, *, host: str = "127.0.0.1", port: int = 8080, parallel: int = 4,
          ctx_size: int | None = None, api_key: str | None = None, max_tokens_limit: int = 4096,
          threads: int | None = None, max_queue: int = 64, max_body_bytes: int = 1 << 20,
          pooling: str | None = None, embedding_batch: int | None = None, chat_template: str | None = None) -> int:
    """Load the model, start the engine and serve until SIGINT/SIGTERM (in-flight streams drain).
    An embedding model (its GGUF names a pooling) gets no engine: it serves /v1/embeddings only."""
    import uvicorn

    from ._embed import check_options, resolve_pooling

    if not is_loopback(host) and not api_key:
        raise InvalidConfigError(f"refusing to listen on {host} without an API key: anyone on the network could "
                                 "use it. Pass --api-key (or set MULLAMA_API_KEY), or bind 127.0.0.1.")
    ContextSettings(n_ctx=ctx_size, n_threads=threads, n_seq_max=parallel)  # bad values fail before the load
    check_options(True, embedding_batch, False)
    check_port_free(host, port)
    model = Model.load(model_ref, chat_template=chat_template)
    if ctx_size is not None and ctx_size > model.n_ctx_train:
        print(f"mullama: warning: --ctx-size {ctx_size} is beyond the {model.n_ctx_train} tokens this model was "
              "trained with; replies may degrade past that point.", file=sys.stderr)
    engine = None
    try:
        resolve_pooling(model, pooling)
        if model.generative:
            engine = Engine(model, parallel=parallel, n_ctx=ctx_size, n_threads=threads, max_queue=max_queue)
    except BaseException:
        model.close()
        raise
    settings = ServerSettings(model_name=str(model_ref), api_key=api_key, max_body_bytes=max_body_bytes,
                              max_tokens_limit=max_tokens_limit, pooling=pooling, embedding_batch=embedding_batch)
    app = AccessLog(create_app(model, engine, settings))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                            ws_max_size=max_body_bytes)
    shown = f"[{host}]" if ":" in host else host
    serving = (f"{parallel} parallel streams, {engine.n_ctx_per_slot} tokens each" if engine is not None
               else f"embeddings only, {model.pooling} pooling")
    ready = f"mullama serving {model_ref} ({serving}) on http://{shown}:{port}/v1"

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started:  # the socket is listening: say so
                print(ready, flush=True)

        @contextlib.contextmanager
        def capture_signals(self):
            # SIGINT/SIGTERM: stop accepting, let in-flight streams finish, exit 0 (uvicorn's own
            # handler re-raises the signal afterwards, which ends the process with -15).
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    server = Server(config)
    try:
        server.run()
    finally:
        if engine is not None:
            engine.stop(drain=True, timeout=30)
            engine.close()
        model.close()
    return 0
