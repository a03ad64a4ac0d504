"""The ASGI application: every wire format's routes over one model pool, plus ``/health`` and
``/metrics`` (Prometheus text). Safe by default: the API key (when set) is checked on every route
but ``/health``, request bodies and ``max_tokens`` are bounded, and no route opens a path a request
names (a request's ``model`` picks among the models the server was started with)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute

from ..generate._engine import Engine
from ..generate._model import Model
from . import (
    _anthropic,
    _conversations,
    _embeddings,
    _infill,
    _lora,
    _ollama,
    _openai,
    _rerank,
    _responses,
    _slots,
    _tokenizer,
)
from ._http import Handler, ServerSettings, ServerState, WireFormat, declared_format, endpoint, speaks, state
from ._openai_shapes import OPENAI
from ._pool import ModelPool
from ._request import APIError
from ._websocket import websocket

__all__ = ["ROUTES", "create_app", "route_format"]


def create_app(source: Model | ModelPool, engine: Engine | None = None,
               settings: ServerSettings | None = None) -> Starlette:
    """The application serving ``source``: a pool of models, or one loaded model with its engine
    (None for an embedding model), which then answers every request whatever its ``model`` says."""
    settings = settings or ServerSettings()
    if isinstance(source, ModelPool):
        pool = source
    else:
        pool = ModelPool.pinned(source, engine, settings.model_name or source.path.stem)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        watcher = asyncio.create_task(pool.run())
        try:
            yield
        finally:
            watcher.cancel()
            await pool.close()

    app = Starlette(routes=ROUTES, exception_handlers={404: _no_route, 405: _no_route}, lifespan=lifespan)
    app.state.mullama = ServerState(settings, pool)
    return app


async def live(request: Request) -> Response:
    """The process answers HTTP (a load balancer's liveness check; no API key needed)."""
    return JSONResponse({"status": "live"})


async def health(request: Request) -> Response:
    """Ready to serve: not shutting down, and every loaded model's engine alive; with how busy they
    are (a load balancer's readiness check; no API key needed). 503 otherwise."""
    server = state(request)
    if server.draining:
        return JSONResponse({"status": "draining", "error": "the server is shutting down"}, status_code=503)
    loaded = server.pool.loaded()
    engines = [served.engine for served in loaded if served.engine is not None]
    dead = [engine for engine in engines if not engine.alive]
    if dead:
        failure = dead[0].failure
        reason = repr(failure) if failure is not None else "the engine is stopped"
        return JSONResponse({"status": "error", "error": reason}, status_code=503)
    return JSONResponse({"status": "ok", "active_streams": sum(engine.active_streams for engine in engines),
                         "waiting": sum(engine.waiting for engine in engines),
                         "loaded": [served.spec.name for served in loaded]})


@endpoint(OPENAI)
async def prometheus(request: Request) -> Response:
    server = state(request)
    pool = server.pool
    engines = [served.engine for served in pool.loaded() if served.engine is not None]
    stats: collections.Counter[str] = collections.Counter(pool.retired_stats)
    for engine in engines:
        stats.update(engine.stats)
    recent = sum(n for _, n in server.metrics.recent) / 60.0
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
        ("mullama_active_streams", "gauge", "Streams being generated now.",
         sum(engine.active_streams for engine in engines)),
        ("mullama_waiting_requests", "gauge", "Requests waiting for a slot.",
         sum(engine.waiting for engine in engines)),
        ("mullama_tokens_per_second", "gauge", "Tokens/s over the last minute.", round(recent, 3)),
        ("mullama_decode_tokens_per_second", "gauge", "Generated tokens per second of decoding.",
         round(decode_tps, 3)),
        ("mullama_models_loaded", "gauge", "Models loaded now.", len(pool.loaded())),
        ("mullama_model_loads_total", "counter", "Models loaded on demand.", pool.loads),
        ("mullama_model_unloads_total", "counter", "Models unloaded (idle, or to make room).", pool.unloads),
        ("mullama_embedding_requests", "gauge", "Embedding and rerank requests waiting for decodes or in them.",
         server.metrics.embedding_requests),
        ("mullama_embedding_requests_running", "gauge", "Embedding and rerank requests on a worker thread now.",
         server.metrics.embedding_running),
        ("mullama_embedding_requests_cancelled_total", "counter",
         "Embedding and rerank requests stopped before their end (their client went away).",
         server.metrics.embedding_cancelled),
    ]
    text = "".join(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name} {value}\n"
                   for name, kind, help_, value in lines)
    text += "# HELP mullama_http_responses_total HTTP responses by status.\n"
    text += "# TYPE mullama_http_responses_total counter\n"
    text += "".join(f'mullama_http_responses_total{{status="{status}"}} {count}\n'
                    for status, count in sorted(server.metrics.http_requests.items()))
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def _no_route(request: Request, exc: Exception) -> Response:
    """A path no route serves (404), or a method its route does not take (405), answered in the error
    shape of the API the path belongs to (``route_format``): ollama's clients read ``{"error": ...}``."""
    status = getattr(exc, "status_code", 404)
    state(request).metrics.count(status)
    problem = APIError(status, f"{request.method} {request.url.path}: "
                               f"{'no such route' if status == 404 else 'method not allowed'}.")
    return JSONResponse(route_format(request.url.path).error_body(problem), status_code=status)


def _by_client(openai: Handler, anthropic: Handler) -> Handler:
    """A path both OpenAI's API and Anthropic's have (GET /v1/models): the anthropic SDK's requests, which
    carry its ``anthropic-version`` header, get Anthropic's shapes; every other client OpenAI's."""
    async def route(request: Request) -> Response:
        return await (anthropic if "anthropic-version" in request.headers else openai)(request)
    return speaks(OPENAI)(route)


ROUTES = [
    Route("/v1/chat/completions", _openai.chat_completions, methods=["POST"]),
    Route("/v1/completions", _openai.completions, methods=["POST"]),
    Route("/v1/embeddings", _embeddings.embeddings, methods=["POST"]),
    Route("/v1/models", _by_client(_openai.list_models, _anthropic.list_models), methods=["GET"]),
    Route("/v1/models/{model:path}", _by_client(_openai.retrieve_model, _anthropic.retrieve_model), methods=["GET"]),
    Route("/v1/responses", _responses.responses, methods=["POST"]),
    Route("/v1/responses/input_tokens", _responses.input_tokens, methods=["POST"]),
    Route("/v1/responses/{response_id}", _responses.retrieve, methods=["GET"]),
    Route("/v1/responses/{response_id}", _responses.delete, methods=["DELETE"]),
    Route("/v1/responses/{response_id}/input_items", _responses.list_input_items, methods=["GET"]),
    Route("/v1/conversations", _conversations.create, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}", _conversations.retrieve, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}", _conversations.update, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}", _conversations.delete, methods=["DELETE"]),
    Route("/v1/conversations/{conversation_id}/items", _conversations.create_items, methods=["POST"]),
    Route("/v1/conversations/{conversation_id}/items", _conversations.list_items, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}/items/{item_id}", _conversations.retrieve_item, methods=["GET"]),
    Route("/v1/conversations/{conversation_id}/items/{item_id}", _conversations.delete_item, methods=["DELETE"]),
    Route("/v1/messages", _anthropic.messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", _anthropic.count_tokens, methods=["POST"]),
    Route("/infill", _infill.infill, methods=["POST"]),
    Route("/rerank", _rerank.rerank, methods=["POST"]),
    Route("/reranking", _rerank.rerank, methods=["POST"]),
    Route("/v1/rerank", _rerank.rerank, methods=["POST"]),
    Route("/v1/reranking", _rerank.rerank, methods=["POST"]),
    Route("/api/chat", _ollama.chat, methods=["POST"]),
    Route("/api/generate", _ollama.generate, methods=["POST"]),
    Route("/api/embed", _ollama.embed, methods=["POST"]),
    Route("/api/embeddings", _ollama.embeddings, methods=["POST"]),
    Route("/api/tags", _ollama.tags, methods=["GET"]),
    Route("/api/ps", _ollama.ps, methods=["GET"]),
    Route("/api/show", _ollama.show, methods=["POST"]),
    Route("/api/pull", _ollama.pull, methods=["POST"]),
    Route("/api/copy", _ollama.copy, methods=["POST"]),
    Route("/api/delete", _ollama.delete, methods=["DELETE", "POST"]),  # ollama's is DELETE
    Route("/api/version", _ollama.version, methods=["GET"]),
    Route("/tokenize", _tokenizer.tokenize, methods=["POST"]),
    Route("/detokenize", _tokenizer.detokenize, methods=["POST"]),
    Route("/apply-template", _tokenizer.apply_template, methods=["POST"]),
    Route("/props", _tokenizer.props, methods=["GET"]),
    Route("/tokenizer_info", _tokenizer.tokenizer_info, methods=["GET"]),
    Route("/slots", _slots.get_slots, methods=["GET"]),
    Route("/lora-adapters", _lora.get_lora_adapters, methods=["GET"]),
    Route("/lora-adapters", _lora.post_lora_adapters, methods=["POST"]),
    Route("/slots/{id_slot}", _slots.post_slot, methods=["POST"]),
    Route("/health", health, methods=["GET"]),
    Route("/health/ready", health, methods=["GET"]),
    Route("/health/live", live, methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
    WebSocketRoute("/v1/ws", websocket),
]


# The format of a path no route serves, by the prefix of the API it would belong to (else OpenAI's).
UNROUTED_FORMATS = (("/api/", _ollama.OLLAMA), ("/v1/messages/", _anthropic.ANTHROPIC))


def route_format(path: str) -> WireFormat:
    """The wire format of the route ``path`` names, as its handler declared it (``endpoint``, ``speaks``):
    what the supervisor answers a proxied request's errors in, and the app a wrong method's (``_no_route``).
    For a path no route serves, the format of the API its prefix belongs to (``/api/...``: ollama's, whose
    clients read ``{"error": ...}``; ``/v1/messages/...``: Anthropic's, such as its batches), else OpenAI's."""
    for route in ROUTES:
        if isinstance(route, Route) and route.path_regex.match(path):
            return declared_format(route.endpoint) or OPENAI
    return next((fmt for prefix, fmt in UNROUTED_FORMATS if path.startswith(prefix)), OPENAI)
