"""The OpenAI wire format: request validation and response shapes (no I/O here).

Every problem with a request becomes an ``APIError`` with an HTTP status and the
OpenAI error body, so the server never answers a malformed request with a 5xx.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ._config import StreamConfig
from ._exceptions import InvalidConfigError, MullamaError

__all__ = ["APIError", "ParsedRequest", "chunk", "completion_body", "error_body", "parse_request", "usage"]

# Fields we honour, and fields OpenAI clients send that we accept and ignore.
_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "stop",
           "seed", "stream", "stream_options", "n", "frequency_penalty", "presence_penalty", "repeat_penalty",
           "ignore_eos", "user", "store", "metadata", "service_tier", "logprobs", "top_logprobs", "logit_bias",
           "response_format", "parallel_tool_calls", "cache_prompt"}
CHAT_FIELDS = _COMMON | {"messages"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
MAX_STOPS = 16


class APIError(Exception):
    """A request the server refuses, with the HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def generation_error(exc: MullamaError) -> APIError:
    """The response for a request whose generation failed after it was accepted."""
    if exc.code == "STREAM_TIMEOUT":
        return APIError(408, str(exc), type="timeout_error", code="stream_timeout")
    if exc.code == "ENGINE_FAILED":
        return APIError(503, str(exc), type="server_error", code="engine_failed")
    if exc.code == "CONTEXT_OVERFLOW":
        return APIError(400, str(exc), code="context_length_exceeded")
    return APIError(500, str(exc), type="server_error", code=exc.code.lower())


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ParsedRequest:
    kind: str  # "chat" or "completion"
    config: StreamConfig
    stream: bool
    include_usage: bool
    messages: list | None = None
    prompt: str | None = None


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise _bad(f"'{name}' must be a number from {low} to {high}.", name)
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise _bad(f"'{name}' must be an integer {bound}.", name)
    return value


def parse_request(body: Any, kind: str, *, max_tokens_limit: int) -> ParsedRequest:
    """Check an OpenAI request body and turn it into a StreamConfig and the prompt or messages."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object.")
    allowed = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if "model" in body and not isinstance(body["model"], str):
        raise _bad("'model' must be a string.", "model")
    n = _integer(body, "n", 1, 1)
    del n
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise _bad("logprobs are not supported by this server.", "logprobs")
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias is not supported by this server.", "logit_bias")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _bad("only response_format {\"type\": \"text\"} is supported.", "response_format")
    if kind == "completion" and (body.get("echo") or body.get("suffix") or body.get("best_of") not in (None, 1)):
        raise _bad("echo, suffix and best_of are not supported by this server.")

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false.", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise _bad("'stream_options' must be an object like {\"include_usage\": true}.", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _bad("'stream_options.include_usage' must be true or false.", "stream_options")

    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    max_tokens = min(max_tokens or max_tokens_limit, max_tokens_limit)

    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop] if stop else []
    elif isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop):
        stops = list(stop)
    else:
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings.", "stop")

    fields: dict[str, Any] = {"max_tokens": max_tokens, "stop_sequences": stops, "timeout_ms": None,
                              "top_p": 1.0, "top_k": 40}
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0),
                            ("frequency_penalty", -2.0, 2.0), ("presence_penalty", -2.0, 2.0),
                            ("repeat_penalty", 0.0, 100.0)):
        value = _number(body, name, low, high)
        if value is not None:
            fields[name] = value
    for name, low_int, high_int in (("top_k", 0, None), ("seed", 0, 2**32 - 2)):
        integer = _integer(body, name, low_int, high_int)
        if integer is not None:
            fields[name] = integer
    for flag in ("ignore_eos", "cache_prompt"):  # llama-server's extensions
        if isinstance(body.get(flag), bool):
            fields[flag] = body[flag]
    try:
        config = StreamConfig(**fields)
    except InvalidConfigError as exc:
        raise _bad(str(exc)) from None

    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list of {role, content} objects.", "messages")
        return ParsedRequest("chat", config, stream, include_usage, messages=messages)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string.", "prompt")
    return ParsedRequest("completion", config, stream, include_usage, prompt=prompt)


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(kind: str, request_id: str, model: str, created: int, *, text: str | None = None,
          role: bool = False, finish_reason: str | None = None) -> dict:
    """One streamed chunk: the role, a piece of text, or the final finish_reason."""
    if kind == "chat":
        delta: dict = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: str, request_id: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def completion_body(kind: str, request_id: str, model: str, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    created = int(time.time())
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}
