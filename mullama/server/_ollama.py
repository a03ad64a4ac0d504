"""ollama's API (``/api/chat``, ``/api/generate``, ``/api/embed``, the legacy ``/api/embeddings``,
``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/pull``, ``/api/copy``, ``/api/delete``,
``/api/version``): requests in, NDJSON lines and bodies out, translated to and from the internal
request the engine serves, and the routes. As ollama: streaming is the default, the prompt of
``/api/generate`` goes through the model's chat template unless ``raw`` (or, with a ``suffix``, makes
a fill-in-the-middle prompt), ``options`` carry the
sampling settings, ``format`` is ``"json"`` or a JSON schema, ``keep_alive`` sets how long the model
stays loaded, durations are nanoseconds, errors are ``{"error": ...}``. ``/api/copy`` and
``/api/delete`` add and remove names of the served models while the server runs (see ModelPool.copy).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from .._exceptions import InvalidConfigError, MullamaError
from ..generate._config import StreamConfig
from ..generate._engine import EngineRequest
from ..generate._sequence import Token
from ._embeddings import embed_request, parse_embedding_request
from ._generation import start
from ._http import (
    WireFormat,
    drain,
    endpoint,
    json_answer,
    read_object,
    requested_model,
    speaks,
    state,
    stream_or_collect,
)
from ._keep_alive import parse_keep_alive
from ._ollama_details import capabilities, chat_template, describe, fills_in, listing, model_projector, running
from ._ollama_shapes import chat_line, done_line
from ._request import APIError, ParsedRequest, bad, boolean, capped_max_tokens, config_error, integer
from ._token_logprobs import Piece, described_tokens, logprob_entries
from ._workers import ADMIN, DOWNLOADS, EMBEDDINGS

__all__ = ["OLLAMA", "chat", "copy", "delete", "embed", "embeddings", "error_body",
           "error_event", "generate", "parse_chat", "parse_generate", "ps", "pull", "shorten", "show", "tags",
           "version"]

VERSION = "0.13.0"  # the ollama API version whose shapes these are
# ollama option -> StreamConfig field (options not listed, such as num_ctx or num_thread, are server settings)
OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
           "stop": "stop_sequences", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "typical_p": "typical_p",
           "mirostat": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta"}
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}  # ollama's own
# StreamConfig field -> the request's field that set it, as errors name it (see config_error)
FIELD_NAMES = {field: f"options.{option}" for option, field in OPTIONS.items()} | {
    "max_tokens": "options.num_predict", "json_schema": "format", "logprobs": "top_logprobs"}
THINK_LEVELS = ("high", "medium", "low")  # ollama's think: true, false, or one of these (thinking too)


def error_body(exc: APIError) -> dict:
    return {"error": exc.message}


def error_event(exc: APIError) -> str:
    """The line that ends a stream that failed."""
    return json.dumps(error_body(exc)) + "\n"


OLLAMA = WireFormat(error_body, error_event, "application/x-ndjson")


def _config(body: dict, max_tokens_limit: int) -> StreamConfig:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise bad("options must be an object.")
    fields: dict[str, Any] = {"timeout_ms": None, **DEFAULTS}
    for name, value in options.items():
        if name in OPTIONS and value is not None:
            fields[OPTIONS[name]] = value if name != "stop" or isinstance(value, list) else [value]
    predict = options.get("num_predict")
    if predict is not None and (isinstance(predict, bool) or not isinstance(predict, int)):
        raise bad("options.num_predict must be an integer (-1: as many as fit).")
    fields["max_tokens"] = capped_max_tokens(None if predict is None or predict < 0 else max(predict, 1),
                                             max_tokens_limit)
    fmt = body.get("format")
    if fmt == "json":
        fields["json_schema"] = {"type": "object"}
    elif isinstance(fmt, dict):
        fields["json_schema"] = fmt
    elif fmt not in (None, ""):
        raise bad("format must be \"json\" or a JSON schema object.")
    logprobs = _logprobs(body)
    if logprobs is not None:
        fields["logprobs"] = logprobs
    try:
        return StreamConfig(**fields)
    except InvalidConfigError as exc:
        raise config_error(exc, FIELD_NAMES) from None
    except TypeError as exc:
        raise bad(f"an option has the wrong type: {exc}") from None


def _logprobs(body: dict) -> int | None:
    """How many alternatives per token the answer's logprobs list (None: no logprobs). As ollama reads
    them: ``logprobs: true`` asks for each generated token's logprob, ``top_logprobs`` (0-20, checked
    even without it) for that many likeliest tokens at each position besides."""
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int)):
        raise bad("top_logprobs must be an integer between 0 and 20", "top_logprobs")
    if top is not None and not 0 <= top <= 20:
        raise bad("top_logprobs must be between 0 and 20", "top_logprobs")  # ollama's words
    return (top or 0) if boolean(body, "logprobs", False) else None


def _stream(body: dict) -> bool:
    """ollama streams unless told ``"stream": false`` (null, as absent: streamed)."""
    return boolean(body, "stream", True)


def _think(body: dict) -> bool:
    """Whether the request asks the model to think (``think``: true or a level): a model whose chat
    template has no thought is then refused, as ollama refuses it (see prompt_tokens). ``false`` turns a
    thinking template's thought off (_template_variables); absent asks nothing."""
    think = body.get("think")
    if think is None or isinstance(think, bool):
        return bool(think)
    if think not in THINK_LEVELS:
        raise bad(f"invalid think value: {think!r} (true, false, or one of {', '.join(THINK_LEVELS)}).", "think")
    return True


def _template_variables(body: dict) -> dict | None:
    """``think: false`` asks a thinking template not to think (Qwen3's ``enable_thinking``), as ollama
    turns thinking off; other templates ignore the variable."""
    return {"enable_thinking": False} if body.get("think") is False else None


def _with_images(text: Any, images: Any, where: str) -> list[dict]:
    """A message's text and its ``images`` (base64, as ollama sends them) as OpenAI content parts: the
    text, then each image."""
    if not isinstance(images, list) or not all(isinstance(image, str) and image for image in images):
        raise bad(f"{where}.images must be a list of base64-encoded images.")
    parts: list[dict] = [{"type": "text", "text": text}] if isinstance(text, str) and text else []
    return parts + [{"type": "image_url", "image_url": {"url": f"data:image/*;base64,{image}"}} for image in images]


def _messages(messages: Any) -> list[dict]:
    """ollama messages as OpenAI-shaped ones (tool call arguments as JSON text)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content}.")
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"messages[{index}] needs a role.")
        entry: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
        if message.get("images"):
            entry["content"] = _with_images(entry["content"], message["images"], f"messages[{index}]")
        calls = message.get("tool_calls")
        if calls:
            entry["tool_calls"] = [{"id": f"call_{number}", "type": "function", "function": {
                "name": (call.get("function") or {}).get("name"),
                "arguments": json.dumps((call.get("function") or {}).get("arguments") or {}, ensure_ascii=False)}}
                for number, call in enumerate(calls) if isinstance(call, dict)]
        result.append(entry)
    return result


def parse_chat(body: Any, *, max_tokens_limit: int) -> ParsedRequest:
    """``/api/chat``: the messages through the chat template; unless ``truncate: false``, a history too
    long for the context loses its oldest messages (ollama's default since 0.12.6)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise bad("tools must be a list.")
    return ParsedRequest("chat", _config(body, max_tokens_limit), _stream(body), False,
                         messages=_messages(body.get("messages")), tools=tools, model=requested_model(body),
                         think=_think(body), truncate=boolean(body, "truncate", True), field_names=FIELD_NAMES,
                         chat_template_kwargs=_template_variables(body))


def parse_generate(body: Any, *, max_tokens_limit: int) -> ParsedRequest:
    """``/api/generate``: the prompt through the chat template (with ``system``) unless ``raw``."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be a non-empty string.")
    if body.get("template"):
        raise bad("template overrides are Go templates, which mullama does not run; start the server with "
                   "--chat-template-file (Jinja), or send raw: true with a prompt you formatted.")
    suffix = None if body.get("raw") else body.get("suffix") or None  # the middle between prompt and suffix
    if suffix is not None and not isinstance(suffix, str):
        raise bad("suffix must be a string: the text after the point to fill in.", "suffix")
    config, stream = _config(body, max_tokens_limit), _stream(body)
    context = body.get("context") or None  # deprecated in ollama, still sent by older clients
    if context is not None and not (isinstance(context, list) and all(
            isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in context)):
        raise bad("context must be the list of token ids an earlier /api/generate answer returned.", "context")
    if body.get("raw") or suffix:
        if body.get("images"):
            raise bad("images need the chat template (raw: false, no suffix).")
        return ParsedRequest("completion", config, stream, False, prompts=[prompt], model=requested_model(body),
                             think=_think(body), field_names=FIELD_NAMES, suffix=suffix)  # and no context
    system = body.get("system")
    messages = ([{"role": "system", "content": system}] if isinstance(system, str) and system else [])
    content = _with_images(prompt, body["images"], "images") if body.get("images") else prompt
    return ParsedRequest("chat", config, stream, False, messages=[*messages, {"role": "user", "content": content}],
                         model=requested_model(body), think=_think(body), field_names=FIELD_NAMES,
                         chat_template_kwargs=_template_variables(body), context=context)


# --- routes ------------------------------------------------------------------------------------
@endpoint(OLLAMA)
async def chat(request: Request) -> Response:
    return await _generation(request, "chat")


@endpoint(OLLAMA)
async def generate(request: Request) -> Response:
    return await _generation(request, "generate")


async def _generation(request: Request, kind: str) -> Response:
    server = state(request)
    started = time.perf_counter()
    body = await read_object(request)
    try:
        keep_alive = parse_keep_alive(body.get("keep_alive"))
    except InvalidConfigError as exc:
        raise bad(str(exc), "keep_alive") from None
    if not body.get("prompt" if kind == "generate" else "messages"):
        return await _load_or_unload(request, kind, body, keep_alive)
    parse = parse_chat if kind == "chat" else parse_generate
    parsed = parse(body, max_tokens_limit=server.settings.max_tokens_limit)
    lease, (job,) = await start(request, parsed, keep_alive=keep_alive)
    name = parsed.model or lease.name
    assert lease.served.model is not None
    piece = lease.served.model._cached_piece

    def answer(tokens: list[Token]) -> dict:
        logprobs = logprob_entries(described_tokens(tokens), piece)
        return _with_context(done_line(kind, name, job, started, job.text, job.tool_calls, logprobs, job.reasoning),
                             kind, parsed, job)

    return await stream_or_collect(request, OLLAMA, lease, [job], stream=parsed.stream,
                                   events=lambda: _lines(job, kind, name, started, request, piece, parsed),
                                   collect=lambda: drain(job), answer=answer)


async def _load_or_unload(request: Request, kind: str, body: dict, keep_alive: float | None) -> Response:
    """ollama's way to load a model (a request with no prompt or messages) or, with ``keep_alive: 0``,
    to unload it: the answer is one done line, its done_reason "load" or "unload"."""
    pool = state(request).pool
    name = requested_model(body)
    spec = pool.find(name)
    unload = keep_alive == 0
    if unload and pool.served(spec) is None:
        reason = "unload"  # not loaded: nothing to do
    else:
        async with await pool.lease(name, keep_alive=keep_alive):
            reason = "unload" if unload else "load"
    line = chat_line(kind, name or spec.name)
    line.update(done=True, done_reason=reason)
    return JSONResponse(line)


def _with_context(line: dict, kind: str, parsed: ParsedRequest, job: EngineRequest) -> dict:
    """/api/generate's done line with ``context``, as ollama's: the tokens of the prompt (after an earlier
    context) and of the answer, which a next request sends back to continue; not for raw prompts or
    prompts with images."""
    sequence = job._sequence
    if kind == "generate" and parsed.kind == "chat" and sequence.media is None:
        line["context"] = [*sequence.prompt_tokens, *sequence.token_ids]
    return line


async def _lines(job: EngineRequest, kind: str, name: str, started: float, request: Request, piece: Piece,
                 parsed: ParsedRequest) -> AsyncGenerator[str, None]:
    """The NDJSON lines of a streamed answer: one per piece of content, with the logprobs (when asked
    for) of the tokens that released it (a token whose text is held back, part of a character or of a
    possible stop sequence, is described with the piece that releases it), the thought's pieces as
    ``thinking``, then the done line."""
    pending: list[Token] = []
    try:
        while (token := await job.next_token()) is not None:
            if token.kind == "reasoning":
                if token.text:
                    yield json.dumps(chat_line(kind, name, thinking=token.text), ensure_ascii=False) + "\n"
                continue
            pending.append(token)
            if token.text and token.kind == "content":
                line = chat_line(kind, name, token.text, logprobs=logprob_entries(pending, piece))
                pending = []
                yield json.dumps(line, ensure_ascii=False) + "\n"
    except MullamaError as exc:
        yield error_event(APIError(500, str(exc)))
        return
    finally:
        job.cancel()
    state(request).finished(request.scope, job.completion_tokens)
    yield json.dumps(_with_context(done_line(kind, name, job, started, "", job.tool_calls), kind, parsed, job),
                     ensure_ascii=False) + "\n"


def shorten(vectors: list[list[float]], dimensions: int | None) -> list[list[float]]:
    """ollama's ``dimensions``: each (unit) vector cut to its first ``dimensions`` values and scaled back
    to unit length; a vector no longer than that is left as it is."""
    if dimensions is None:
        return vectors
    shortened = []
    for vector in vectors:
        if dimensions < len(vector):
            vector = vector[:dimensions]
            norm = math.sqrt(sum(x * x for x in vector))
            vector = [x / norm for x in vector] if norm > 0 else vector
        shortened.append(vector)
    return shortened


@endpoint(OLLAMA)
async def embed(request: Request) -> Response:
    """ollama's ``/api/embed``: unit vectors of ``input``; ``truncate`` (default true) cuts an input longer
    than the embedding batch to its beginning (false: a 400), ``dimensions`` shortens each vector
    (renormalised), ``keep_alive`` as for generation."""
    server = state(request)
    started = time.perf_counter()
    body = await read_object(request)
    parsed = parse_embedding_request({"input": body.get("input"), "model": body.get("model")},
                                     max_inputs=server.settings.max_embedding_inputs)
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise bad("truncate must be true or false.", "truncate")
    parsed.truncate = truncate
    dimensions = integer(body, "dimensions", 1)
    try:
        keep_alive = parse_keep_alive(body.get("keep_alive"))
    except InvalidConfigError as exc:
        raise bad(str(exc), "keep_alive") from None
    name, vectors, n_tokens = await embed_request(request, parsed, keep_alive=keep_alive)
    total_duration = int((time.perf_counter() - started) * 1e9)
    return await json_answer(lambda: {"model": parsed.model or name, "embeddings": shorten(vectors, dimensions),
                                      "total_duration": total_duration, "load_duration": 0,
                                      "prompt_eval_count": n_tokens}, workers=EMBEDDINGS)


@endpoint(OLLAMA)
async def embeddings(request: Request) -> Response:
    """ollama's legacy ``/api/embeddings`` (``Client.embeddings``, older integrations): one ``prompt``
    in, ``{"embedding": [...]}`` out, the raw vector as ollama answers it (``/api/embed``'s are unit
    length). An empty prompt only loads the model and answers an empty vector, as ollama's."""
    server = state(request)
    body = await read_object(request)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise bad("prompt must be a string.", "prompt")
    if not prompt:
        async with await server.pool.lease(requested_model(body)):
            return JSONResponse({"embedding": []})
    parsed = parse_embedding_request({"input": prompt, "model": body.get("model", body.get("name"))})
    parsed.normalize = False
    _name, vectors, _n_tokens = await embed_request(request, parsed)
    return JSONResponse({"embedding": vectors[0]})


def _name_field(body: dict, field: str) -> str:
    """A non-empty string field of a request (ollama's 400 otherwise)."""
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise bad(f"{field} is required: a model name.", field)
    return value


@endpoint(OLLAMA)
async def copy(request: Request) -> Response:
    """ollama's ``/api/copy``: ``destination`` becomes one more name of the served model ``source``
    names, which listings show, while the server runs (nothing is written to disk)."""
    body = await read_object(request)
    state(request).pool.copy(_name_field(body, "source"), _name_field(body, "destination"))
    return Response(status_code=200)


@endpoint(OLLAMA)
async def delete(request: Request) -> Response:
    """ollama's ``/api/delete``: removes a name ``/api/copy`` gave; the models the server was started
    with stay (see ModelPool.delete)."""
    body = await read_object(request)
    name = requested_model(body)
    if not name:
        raise bad("model is required: the name to delete.", "model")
    state(request).pool.delete(name)
    return Response(status_code=200)


@endpoint(OLLAMA)
async def tags(request: Request) -> Response:
    """Every model this server answers for, and each copy (``/api/copy``) as a model of its own, as
    ollama lists them."""
    pool = state(request).pool
    entries = [(spec, None) for spec in pool.specs] + [(pool.find(name), name) for name in pool.copies]
    return JSONResponse({"models": await ADMIN.run(lambda: [listing(pool, *entry) for entry in entries])})


@endpoint(OLLAMA)
async def ps(request: Request) -> Response:
    """The models in memory now (one being unloaded until its memory is given back): their memory
    (weights and KV cache), when they unload, how long idle."""
    pool = state(request).pool
    loaded = pool.in_memory()
    return JSONResponse({"models": await ADMIN.run(lambda: [running(pool, served) for served in loaded])})


@endpoint(OLLAMA)
async def show(request: Request) -> Response:
    body = await read_object(request)
    pool = state(request).pool
    spec = pool.find(requested_model(body))
    described = await ADMIN.run(lambda: describe(spec, model_projector(pool, spec)))
    template = chat_template(pool, spec, described)
    shown = {"modelfile": f"FROM {spec.ref}\n", "parameters": "", "template": template,
             "details": described["details"], "model_info": described["model_info"],
             "modified_at": described["modified_at"],
             "capabilities": capabilities(described, template, fills_in(pool, spec, described))}
    if "projector_info" in described:  # as ollama shows a model with a projector
        shown["projector_info"] = described["projector_info"]
    return JSONResponse(shown)


@speaks(OLLAMA)
async def version(request: Request) -> Response:
    """The ollama API version whose shapes these are (no API key needed, as /health)."""
    return JSONResponse({"version": VERSION})


@endpoint(OLLAMA)
async def pull(request: Request) -> Response:
    """Download a hub model into the cache (verified, resumable), streaming ollama's progress lines."""
    from ..hub._catalog import entry_for

    body = await read_object(request)
    name = requested_model(body)
    if not name:
        raise bad("pull needs a model name, such as smollm2:135m.", "model")
    entry = await ADMIN.run(entry_for, name)  # MODEL_NOT_FOUND (404) for an unknown name
    stream = _stream(body)
    lines = _pull_lines(entry)
    if stream:
        return StreamingResponse(lines, media_type="application/x-ndjson")
    last: dict = {}
    async for line in lines:
        last = json.loads(line)
    if "error" in last:
        raise APIError(500, last["error"])
    return JSONResponse(last)


async def _pull_lines(entry: Any) -> AsyncGenerator[str, None]:
    from ..hub._download import progress_listener
    from ..hub._pull import pull as pull_model

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict | None] = asyncio.Queue()

    def progress(label: str, total: int, done: int) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, {"status": f"pulling {label}", "digest": label,
                                                     "total": total, "completed": done})

    def work() -> None:
        progress_listener.set(progress)
        try:
            pull_model(entry, quiet=True)
            for status in ("verifying sha256 digest", "writing manifest", "success"):
                loop.call_soon_threadsafe(queue.put_nowait, {"status": status})
        except MullamaError as exc:
            loop.call_soon_threadsafe(queue.put_nowait, {"error": str(exc)})
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    yield json.dumps({"status": "pulling manifest"}) + "\n"
    task = asyncio.create_task(DOWNLOADS.run(work))
    while (line := await queue.get()) is not None:
        yield json.dumps(line) + "\n"
    await task
