"""Anthropic's Messages API wire format (``POST /v1/messages``): requests in, responses and
stream events out, translated to and from the internal request the engine serves, and the routes
``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Text blocks, ``system``, ``stop_sequences``, sampling fields, ``stream`` and tools (``tools``,
``tool_choice``, ``tool_use`` / ``tool_result`` blocks) map onto mullama's chat; errors have
Anthropic's shape, ``{"type": "error", "error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncGenerator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._exceptions import InvalidConfigError, MullamaError
from ..generate._config import StreamConfig
from ..generate._engine import EngineRequest
from ._generation import count_prompt_tokens, start
from ._http import SSE, WireFormat, drain, endpoint, read_json, requested_model, state, stream_or_collect
from ._request import APIError, ParsedRequest, bad, boolean, capped_max_tokens, config_error, json_schema_constraint
from ._tool_calls import CallStart, ToolCallProgress

__all__ = ["ANTHROPIC", "ThreadRefused", "count_tokens", "error_body", "error_event", "event", "message_body",
           "messages", "parse_request", "stop_reason", "to_count_request"]

FIELDS = {"model", "messages", "system", "max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream",
          "tools", "tool_choice", "output_config",
          # accepted and ignored (what the SDK may send that has no meaning for a local model)
          "metadata", "service_tier", "thinking", "cache_control", "container", "diagnostics", "inference_geo",
          "speed", "user_profile_id", "workspace_id"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error"}


class ThreadRefused(APIError):
    """A request with ``thread`` (Anthropic's message threads, which keep the conversation on the
    server): refused, this server keeps none. Its error carries Anthropic's ``details`` for it
    (``error_code`` ``thread_unsupported_request``), on which the SDK's threads and tool runner
    send the turn again, whole and without ``thread``."""

    def __init__(self) -> None:
        super().__init__(400, "thread: message threads are not supported: this server keeps no conversations. "
                              "Send the whole conversation in 'messages', without 'thread'.", param="thread",
                         code="thread_unsupported_request")
        self.details = {"error_code": "thread_unsupported_request", "unsupported": ["thread"]}


def error_body(exc: APIError) -> dict:
    """Anthropic's error shape for a refused request (with its ``details``, when it has them)."""
    error: dict[str, Any] = {"type": ERROR_TYPES.get(exc.status, "api_error"), "message": exc.message}
    if isinstance(exc, ThreadRefused):
        error["details"] = exc.details
    return {"type": "error", "error": error}


def error_event(exc: APIError) -> str:
    """The ``error`` event that ends a Messages stream that failed."""
    return event("error", {"error": error_body(exc)["error"]})


ANTHROPIC = WireFormat(error_body, error_event, SSE)


def _text_of(blocks: Any, where: str) -> str:
    """The text of a content value: a string, or a list of text blocks (joined)."""
    if isinstance(blocks, str):
        return blocks
    if isinstance(blocks, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                        and isinstance(b.get("text"), str) for b in blocks):
        return "\n".join(block["text"] for block in blocks)
    raise bad(f"{where} must be a string or a list of text blocks.")


def _messages(body: dict) -> list[dict]:
    """Anthropic messages as OpenAI-shaped chat messages (tool_use → tool_calls, tool_result → tool)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages: a non-empty list of {role, content} is required.")
    result: list[dict] = []
    system = body.get("system")
    if system is not None:
        result.append({"role": "system", "content": _text_of(system, "system")})
    called: set[str] = set()  # the tool_use ids of the message before: the only ones a tool_result may answer
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise bad(f"{where}.role must be 'user' or 'assistant'.")
        role, content = message["role"], message.get("content")
        if isinstance(content, str):
            result.append({"role": role, "content": content})
            called = set()
            continue
        if not isinstance(content, list) or not content:
            raise bad(f"{where}.content must be a string or a non-empty list of content blocks.")
        texts, calls, results, parts = [], [], [], []  # parts: text and images in order, when there are images
        for number, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" and role == "user":
                url = _image_url(block, f"{where}.content.{number}")
                parts.append({"type": "image_url", "image_url": {"url": url}})
            elif kind == "tool_use" and role == "assistant" and isinstance(block.get("name"), str):
                if not isinstance(block.get("input"), dict):
                    raise bad(f"{where}.content.{number}.tool_use.input: an object is required "
                              f"(the tool's arguments), not {type(block.get('input')).__name__}.")
                calls.append({"id": str(block.get("id") or ""), "type": "function", "function": {
                    "name": block["name"], "arguments": json.dumps(block["input"], ensure_ascii=False)}})
            elif kind == "tool_result" and role == "user" and isinstance(block.get("tool_use_id"), str):
                if block["tool_use_id"] not in called:
                    raise bad(f"{where}.content.{number}: unexpected `tool_use_id` found in `tool_result` blocks: "
                              f"{block['tool_use_id']}. Each `tool_result` block must have a corresponding "
                              "`tool_use` block in the previous message.")
                value = block.get("content", "")
                results.append({"role": "tool", "tool_call_id": block["tool_use_id"],
                                "content": _text_of(value, f"{where}.content.{number}.content")})
            else:
                raise bad(f"{where}.content.{number}: unsupported content block "
                           f"{kind!r} (text, image in user turns, tool_use in assistant turns, tool_result in "
                           "user turns).")
        called = {str(call["id"]) for call in calls}
        result.extend(results)
        if texts or calls or not results:
            entry: dict[str, Any] = {"role": role, "content": "\n".join(texts) if texts or not calls else None}
            if len(parts) > len(texts):  # images: OpenAI's content parts, joined as llama.cpp joins them
                entry["content"] = parts
            if calls:
                entry["tool_calls"] = calls
            result.append(entry)
    return result


def _image_url(block: dict, where: str) -> str:
    """An Anthropic image block's source as a URL mullama reads: base64 data as a data: URI, a url as it is."""
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str):
        media_type = source.get("media_type")
        if not isinstance(media_type, str) or not media_type.startswith("image/"):
            raise bad(f"{where}.source.media_type must be an image type such as 'image/png', not {media_type!r}.")
        return f"data:{media_type};base64,{source['data']}"
    if isinstance(source, dict) and source.get("type") == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise bad(f"{where}.source must be {{'type': 'base64', 'media_type': 'image/...', 'data': ...}} or "
              "{'type': 'url', 'url': ...}.")


THINKING_TYPES = ("enabled", "disabled", "adaptive", "between_tools")
MIN_THINKING_BUDGET = 1024  # Anthropic's least budget_tokens


def _check_thinking(thinking: Any, max_tokens: int) -> None:
    """Refuse a ``thinking`` setting Anthropic refuses (it is otherwise ignored: the chat template
    decides whether a local model thinks): an object of a known ``type``; ``enabled`` needs an
    integer ``budget_tokens`` of at least 1024 and below ``max_tokens``."""
    if thinking is None:
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in THINKING_TYPES:
        raise bad("thinking: must be an object whose type is one of " + ", ".join(map(repr, THINKING_TYPES)) + ".")
    display = thinking.get("display")
    if display is not None and display not in ("summarized", "omitted"):
        raise bad("thinking.display: must be 'summarized' or 'omitted'.")
    if thinking["type"] != "enabled":
        return
    budget = thinking.get("budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise bad("thinking.enabled.budget_tokens: an integer is required.")
    if budget < MIN_THINKING_BUDGET:
        raise bad(f"thinking.enabled.budget_tokens: Input should be greater than or equal to {MIN_THINKING_BUDGET}")
    if max_tokens <= budget:
        raise bad("`max_tokens` must be greater than `thinking.budget_tokens`.")


EFFORTS = ("low", "medium", "high", "xhigh", "max")


def _output_config(value: Any) -> dict[str, Any]:
    """``output_config`` as StreamConfig fields: a ``json_schema`` format constrains the answer to the
    schema (through the same rule as every route's json_schema), which comes back as one text block of
    JSON (what the SDK's ``messages.parse`` reads); ``effort`` is checked and has no effect: a local
    model's effort is its ``max_tokens`` and its chat template."""
    if value is None:
        return {}
    if not isinstance(value, dict) or set(value) - {"effort", "format"}:
        raise bad("output_config: an object with 'format' and/or 'effort' is required.")
    if value.get("effort") not in (None, *EFFORTS):
        raise bad("output_config.effort: must be one of " + ", ".join(map(repr, EFFORTS)) + ".")
    fmt = value.get("format")
    if fmt is None:
        return {}
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise bad("output_config.format: must be {\"type\": \"json_schema\", \"schema\": {...}}.")
    return json_schema_constraint(fmt["schema"], "output_config.format.schema")


def _tools(body: dict) -> tuple[list[dict] | None, Any, bool]:
    """Anthropic tools and tool_choice as OpenAI's (tools, tool_choice, parallel_tool_calls)."""
    tools = body.get("tools")
    if tools is None:
        if body.get("tool_choice") is not None:
            raise APIError(400, "tool_choice needs tools.", param="tool_choice")
        return None, "auto", True
    if not isinstance(tools, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tools):
        raise APIError(400, "tools must be a list of {name, description, input_schema}.", param="tools")
    converted = [{"type": "function", "function": {
        "name": tool["name"], "description": tool.get("description", ""),
        "parameters": tool.get("input_schema") or {"type": "object"}}} for tool in tools]
    choice = body.get("tool_choice") or {"type": "auto"}
    kind = choice.get("type") if isinstance(choice, dict) else None
    parallel = not (isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True)
    if kind == "auto":
        return converted, "auto", parallel
    if kind == "none":
        return converted, "none", parallel
    if kind == "any":
        return converted, "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return converted, {"type": "function", "function": {"name": choice["name"]}}, False
    raise APIError(400, "tool_choice must be {type: auto|any|none} or {type: tool, name}.", param="tool_choice")


def parse_request(body: Any, *, max_tokens_limit: int) -> ParsedRequest:
    """Check a Messages request and turn it into the chat request the engine serves."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    if "thread" in body:
        raise ThreadRefused()
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise bad(f"{unknown[0]}: Extra inputs are not permitted")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise bad("max_tokens: an integer of at least 1 is required.")
    _check_thinking(body.get("thinking"), max_tokens)
    stream = boolean(body, "stream", False)
    stops = body.get("stop_sequences") or []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 16:
        raise bad("stop_sequences must be a list of at most 16 non-empty strings.")
    fields: dict[str, Any] = {"max_tokens": capped_max_tokens(max_tokens, max_tokens_limit), "stop_sequences": stops,
                              "timeout_ms": None, "temperature": 1.0,  # Anthropic's default temperature
                              **_output_config(body.get("output_config"))}
    for name, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):
        value = body.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise bad(f"{name} must be a number from {low} to {high}.")
            fields[name] = float(value)
    top_k = body.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise bad("top_k must be a positive integer.")
        fields["top_k"] = top_k
    try:
        config = StreamConfig(**fields)
    except InvalidConfigError as exc:
        raise config_error(exc) from None
    tools, tool_choice, parallel = _tools(body)
    return ParsedRequest("chat", config, stream, False, messages=_messages(body), tools=tools,
                         tool_choice=tool_choice, parallel_tool_calls=parallel, model=requested_model(body))


def to_count_request(body: Any) -> ParsedRequest:
    """A count_tokens request (model, messages, system, tools) as a chat request."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    return parse_request({**{k: v for k, v in body.items() if k in ("model", "messages", "system", "tools",
                                                                     "tool_choice")}, "max_tokens": 1},
                         max_tokens_limit=1)


def stop_reason(finish_reason: str | None, stop_sequence: str | None) -> str:
    """Anthropic's stop_reason for a finished sequence."""
    if finish_reason == "tool_calls":
        return "tool_use"
    if finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def new_id() -> str:
    return f"msg_{secrets.token_hex(12)}"


def usage(job: EngineRequest, output_tokens: int) -> dict:
    """A message's usage as llama-server gives it: the prompt tokens read from the cache (a slot's kept
    prefix) as ``cache_read_input_tokens``, the rest as ``input_tokens`` (Anthropic's meaning: the
    total is their sum)."""
    return {"cache_read_input_tokens": job.cached_tokens, "input_tokens": job.prompt_tokens - job.cached_tokens,
            "output_tokens": output_tokens}


def message_body(message_id: str, model: str, job: EngineRequest) -> dict:
    """A whole (non-streamed) Messages response for a finished ``job``."""
    text, calls, stop = job.text, job.tool_calls, job.stop_sequence
    content: list[dict] = [{"type": "text", "text": text}] if text or not calls else []
    content += [{"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)}
                for call in calls]
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason(job.finish_reason, stop), "stop_sequence": stop,
            "usage": usage(job, job.completion_tokens)}


def event(kind: str, payload: dict) -> str:
    """One server-sent event of a Messages stream."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, ensure_ascii=False)}\n\n"


# --- routes ------------------------------------------------------------------------------------
@endpoint(ANTHROPIC)
async def messages(request: Request) -> Response:
    """``POST /v1/messages``: a whole message, or its stream of events."""
    parsed = parse_request(await read_json(request), max_tokens_limit=state(request).settings.max_tokens_limit)
    lease, (job,) = await start(request, parsed)
    message_id, name = new_id(), lease.name
    return await stream_or_collect(
        request, ANTHROPIC, lease, [job], stream=parsed.stream,
        events=lambda: _events(job, message_id, name, request), collect=lambda: drain(job),
        answer=lambda _: message_body(message_id, name, job))


@endpoint(ANTHROPIC)
async def count_tokens(request: Request) -> Response:
    """``POST /v1/messages/count_tokens``: the tokens of the rendered prompt."""
    parsed = to_count_request(await read_json(request))
    return JSONResponse({"input_tokens": await count_prompt_tokens(request, parsed)})


async def _events(job: EngineRequest, message_id: str, model_name: str, request: Request) -> AsyncGenerator[str, None]:
    """message_start, then a content block per kind of output (text, thinking, tool_use) with its
    deltas, then message_delta (stop_reason, usage) and message_stop. message_start comes with the
    first token, as llama-server's: the prompt is then in a slot, and how much of it came from the
    cache is known."""
    index, open_kind = -1, None
    calls = ToolCallProgress()

    def begin(kind: str, block: dict) -> list[str]:
        nonlocal index, open_kind
        events: list[str] = [event("content_block_stop", {"index": index})] if open_kind else []
        index, open_kind = index + 1, kind
        return [*events, event("content_block_start", {"index": index, "content_block": block})]

    try:
        token = await job.next_token()
        yield event("message_start", {"message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model_name, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": usage(job, 0)}})
        while token is not None:
            parser = job._sequence.tools
            for call in calls.after(parser) if parser is not None else []:
                if isinstance(call, CallStart):
                    for item in begin("tool_use", {"type": "tool_use", "id": call.id, "name": call.name,
                                                   "input": {}}):
                        yield item
                else:
                    yield event("content_block_delta", {"index": index, "delta": {
                        "type": "input_json_delta", "partial_json": call.text}})
            if token.text:
                kind = "thinking" if token.kind == "reasoning" else "text"
                if open_kind != kind:
                    for item in begin(kind, {"type": kind, kind: ""}):
                        yield item
                yield event("content_block_delta", {"index": index, "delta": {"type": f"{kind}_delta",
                                                                              kind: token.text}})
            token = await job.next_token()
    except MullamaError as exc:
        yield error_event(APIError(500, str(exc)))
        return
    finally:
        job.cancel()
    if open_kind is None:
        for item in begin("text", {"type": "text", "text": ""}):
            yield item
    yield event("content_block_stop", {"index": index})
    state(request).finished(request.scope, job.completion_tokens)
    yield event("message_delta", {
        "delta": {"stop_reason": stop_reason(job.finish_reason, job.stop_sequence), "stop_sequence": job.stop_sequence},
        # cumulative, as Anthropic's are (LangChain reads the stream's usage from this event alone)
        "usage": usage(job, job.completion_tokens)})
    yield event("message_stop", {})


# --- models: GET /v1/models is OpenAI's path too; the app sends the anthropic SDK's requests here --------
def _model_object(spec_name: str, created: int) -> dict:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    return {"type": "model", "id": spec_name, "display_name": spec_name, "created_at": stamp}


@endpoint(ANTHROPIC)
async def list_models(request: Request) -> Response:
    """Anthropic's list of models: every model the server answers for, with its ids first and last."""
    server = state(request)
    data = [_model_object(spec.name, server.created) for spec in server.pool.specs]
    return JSONResponse({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None})


@endpoint(ANTHROPIC)
async def retrieve_model(request: Request) -> Response:
    """One model, by its name or an alias; any other name is Anthropic's 404 ``not_found_error``."""
    server = state(request)
    name = request.path_params["model"]
    spec = server.pool.named_exactly(name)
    if spec is None:
        raise APIError(404, f"model: {name[:200]}", type="not_found_error", param="model")
    return JSONResponse(_model_object(spec.name, server.created))
