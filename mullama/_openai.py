"""The OpenAI wire format: request validation and response shapes (no I/O here).

Every problem with a request becomes an ``APIError`` with an HTTP status and the
OpenAI error body, so the server never answers a malformed request with a 5xx.
"""

from __future__ import annotations

import array
import math
import secrets
import sys
import time
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._config import StreamConfig
from ._exceptions import InvalidConfigError, MullamaError
from ._sequence import Token

__all__ = ["APIError", "EmbeddingRequest", "ParsedRequest", "chunk", "completion_body", "embedding_body",
           "error_body", "parse_embedding_request", "parse_request", "usage"]

# Fields we honour, and fields OpenAI clients send that we accept and ignore.
_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "stop",
           "seed", "stream", "stream_options", "n", "frequency_penalty", "presence_penalty", "repeat_penalty",
           "ignore_eos", "user", "store", "metadata", "service_tier", "logprobs", "top_logprobs", "logit_bias",
           "response_format", "parallel_tool_calls", "cache_prompt", "tools", "tool_choice", "reasoning_format",
           # llama-server's sampling extensions
           "grammar", "json_schema", "typical_p", "repeat_last_n", "mirostat", "mirostat_tau", "mirostat_eta",
           "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "xtc_probability",
           "xtc_threshold", "top_n_sigma"}
CHAT_FIELDS = _COMMON | {"messages"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
MAX_STOPS = 16
MAX_CHOICES = 8


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
    n: int = 1  # choices, each its own sequence
    tools: list | None = None
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    reasoning_format: str = "auto"

    def choice_configs(self, config: StreamConfig | None = None) -> list[StreamConfig]:
        """One config per choice (from ``config``, else the request's): with a seed, choice i samples
        with seed + i (so choices differ)."""
        config = config or self.config
        seed = config.seed
        if self.n == 1 or seed is None:
            return [config] * self.n
        return [config.with_options(seed=(seed + i) % (2**32 - 1)) for i in range(self.n)]


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
    n = _integer(body, "n", 1, MAX_CHOICES) or 1
    n_logprobs = _requested_logprobs(body, kind)
    tools = body.get("tools") or None
    if tools is not None and kind != "chat":
        raise _bad("tools are for /v1/chat/completions.", "tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad("'tools' must be a list of function tools.", "tools")
    tool_choice = body.get("tool_choice")
    tool_choice = "auto" if tool_choice is None else tool_choice
    if tool_choice not in ("auto", "none", "required") and not isinstance(tool_choice, dict):
        raise _bad("'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", ...}.",
                   "tool_choice")
    if tools is None and tool_choice not in ("auto", "none"):
        raise _bad("'tool_choice' needs 'tools'.", "tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise _bad("'parallel_tool_calls' must be true or false.", "parallel_tool_calls")
    reasoning_format = body.get("reasoning_format", "auto")
    if reasoning_format not in ("auto", "none", "deepseek"):
        raise _bad("'reasoning_format' must be 'auto', 'deepseek' (the same) or 'none'.", "reasoning_format")
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
    for name in ("typical_p", "mirostat_tau", "mirostat_eta", "dry_multiplier", "dry_base", "xtc_probability",
                 "xtc_threshold", "top_n_sigma"):
        number = _number(body, name, -1e9, 1e9)
        if number is not None:
            fields[name] = number
    for name in ("repeat_last_n", "mirostat", "dry_allowed_length", "dry_penalty_last_n"):
        integer = _integer(body, name, -1, 2**31 - 1)
        if integer is not None:
            fields[name] = integer
    fields.update(_output_constraint(body))
    if n_logprobs is not None:
        fields["logprobs"] = n_logprobs
    bias = _logit_bias(body.get("logit_bias"))
    if bias:
        fields["logit_bias"] = bias
    try:
        config = StreamConfig(**fields)
    except InvalidConfigError as exc:
        raise _bad(str(exc)) from None

    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list of {role, content} objects.", "messages")
        return ParsedRequest("chat", config, stream, include_usage, messages=messages, n=n, tools=tools,
                             tool_choice=tool_choice, parallel_tool_calls=parallel,
                             reasoning_format="none" if reasoning_format == "none" else "auto")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string.", "prompt")
    return ParsedRequest("completion", config, stream, include_usage, prompt=prompt, n=n)


def _requested_logprobs(body: dict, kind: str) -> int | None:
    """How many alternatives per token the request wants (None: no logprobs). Chat: ``logprobs: true``
    with ``top_logprobs`` 0-20; completions: ``logprobs`` 0-20 (OpenAI's legacy field)."""
    if kind == "chat":
        wanted = body.get("logprobs")
        if wanted not in (None, True, False):
            raise _bad("'logprobs' must be true or false.", "logprobs")
        top = _integer(body, "top_logprobs", 0, 20)
        if top is not None and not wanted:
            raise _bad("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
        return (top or 0) if wanted else None
    if body.get("top_logprobs") is not None:
        raise _bad("completions take 'logprobs': N; 'top_logprobs' is for chat.", "top_logprobs")
    return _integer(body, "logprobs", 0, 20)


Piece = Callable[[int], bytes]  # a token id's bytes (Model._cached_piece)


def logprobs_body(kind: str, tokens: list[Token] | None, piece: Piece) -> dict | None:
    """The ``logprobs`` of a choice for ``tokens`` (those that carry logprobs; end-of-generation tokens,
    which have no text, are left out as OpenAI does), or None when they carry none."""
    kept = [t for t in tokens or () if t.logprob is not None and (t.text or piece(t.id))]
    if not kept:
        return None
    if kind == "chat":
        return {"content": [{"token": piece(t.id).decode("utf-8", "replace"), "logprob": t.logprob,
                             "bytes": list(piece(t.id)),
                             "top_logprobs": [{"token": top.text, "logprob": top.logprob, "bytes": list(top.bytes)}
                                              for top in t.top_logprobs]} for t in kept],
                "refusal": None}
    offsets, offset = [], 0
    for t in kept:
        offsets.append(offset)
        offset += len(t.text)
    return {"tokens": [piece(t.id).decode("utf-8", "replace") for t in kept],
            "token_logprobs": [t.logprob for t in kept],
            "top_logprobs": [{top.text: top.logprob for top in t.top_logprobs} for t in kept],
            "text_offset": offsets}


def _output_constraint(body: dict) -> dict[str, Any]:
    """``response_format`` (OpenAI), or llama-server's ``grammar`` / ``json_schema``, as StreamConfig fields."""
    response_format = body.get("response_format")
    grammar, schema = body.get("grammar"), body.get("json_schema")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object",
                                                                                          "json_schema"):
            raise _bad("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                       "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}.",
                       "response_format")
        kind = response_format["type"]
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                raise _bad("'response_format.json_schema' must be an object with a 'schema'.", "response_format")
            schema = spec.get("schema", {})
    if grammar is not None and schema is not None:
        raise _bad("send one of 'grammar', 'json_schema' and a JSON 'response_format', not several.", "grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise _bad("'grammar' must be GBNF text with a root rule.", "grammar")
        return {"grammar": grammar}
    if schema is not None:
        if not isinstance(schema, (dict, bool)):
            raise _bad("'json_schema' must be a JSON Schema object.", "json_schema")
        # As llama-server: an empty schema asks for a JSON object (the converter would allow any value).
        return {"json_schema": {"type": "object"} if schema == {} else schema}
    return {}


def _logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's logit_bias: token ids as strings (or ints) -> a bias from -100 to 100."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 1024:
        raise _bad("'logit_bias' must be an object of at most 1024 token ids -> biases.", "logit_bias")
    result: dict[int, float] = {}
    for key, bias in value.items():
        token = key if isinstance(key, int) else int(key) if isinstance(key, str) and key.isdigit() else None
        if token is None or isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                or not math.isfinite(bias) or not -100 <= bias <= 100:
            raise _bad(f"'logit_bias' maps token ids to numbers from -100 to 100; {key!r}: {bias!r} is not that.",
                       "logit_bias")
        result[token] = float(bias)
    return result


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(kind: str, request_id: str, model: str, created: int, *, text: str | None = None,
          role: bool = False, finish_reason: str | None = None, logprobs: dict | None = None,
          index: int = 0, tool_call: dict | None = None, reasoning: str | None = None) -> dict:
    """One streamed chunk of choice ``index``: the role, a piece of text (and the logprobs of its
    tokens), a piece of a tool call (``delta.tool_calls``), or the final finish_reason."""
    if kind == "chat":
        delta: dict = {}
        if role:
            delta = {"role": "assistant", "content": ""}
        elif tool_call is not None:
            delta = {"tool_calls": [tool_call]}
        elif reasoning is not None:
            delta = {"reasoning_content": reasoning}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: str, request_id: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


@dataclass
class Choice:
    """One finished choice of a non-streamed answer."""

    text: str
    finish_reason: str
    logprobs: dict | None = None
    tool_calls: list[dict] | None = None
    reasoning: str | None = None


def completion_body(kind: str, request_id: str, model: str, choices: list[Choice], prompt_tokens: int,
                    completion_tokens: int) -> dict:
    created = int(time.time())
    if kind == "chat":
        items = [{"index": i, "message": _message(c), "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                 for i, c in enumerate(choices)]
        obj = "chat.completion"
    else:
        items = [{"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                 for i, c in enumerate(choices)]
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": items,
            "usage": usage(prompt_tokens, completion_tokens)}


def _message(choice: Choice) -> dict:
    """The assistant message of a chat choice: content, its thought (``reasoning_content``), and its
    tool calls (content null when there is no text besides them)."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.reasoning:
        message["reasoning_content"] = choice.reasoning
    if choice.tool_calls:
        message["content"] = choice.text or None
        message["tool_calls"] = choice.tool_calls
    return message


class ToolCallDeltas:
    """Streamed ``delta.tool_calls`` of one choice, from its sequence's tool-call parser: the call's
    index, id, type and name first, then its arguments in pieces, as OpenAI streams them."""

    def __init__(self) -> None:
        self.index = 0  # the call being streamed
        self.sent = 0  # characters of its arguments sent
        self.named = False
        self.call_id = ""

    def after(self, parser: Any) -> list[dict]:
        """The deltas a token added (``parser`` is the sequence's ToolCallParser)."""
        deltas = []
        while self.index < len(parser.calls):  # calls completed: send what is left of them
            call = parser.calls[self.index]
            deltas += self._progress(call.name, call.arguments, call.id)
            self.index, self.sent, self.named = self.index + 1, 0, False
        if parser.in_call and parser.name is not None:
            deltas += self._progress(parser.name, parser.arguments, None)
        return deltas

    def _progress(self, name: str, arguments: str, call_id: str | None) -> list[dict]:
        deltas = []
        if not self.named:
            self.named = True
            self.call_id = call_id or f"call_{secrets.token_hex(12)}"
            deltas.append({"index": self.index, "id": self.call_id, "type": "function",
                           "function": {"name": name, "arguments": ""}})
        if len(arguments) > self.sent:
            deltas.append({"index": self.index, "function": {"arguments": arguments[self.sent:]}})
            self.sent = len(arguments)
        return deltas


# --- embeddings ------------------------------------------------------------------------------
EMBEDDING_FIELDS = {"input", "model", "encoding_format", "dimensions", "user"}
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit on inputs per request


@dataclass
class EmbeddingRequest:
    """An embeddings request: texts to tokenise, or token lists given as they are."""

    texts: list[str] | None
    token_lists: list[list[int]] | None
    base64: bool
    dimensions: int | None


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value)


def parse_embedding_request(body: Any, *, max_inputs: int = MAX_EMBEDDING_INPUTS) -> EmbeddingRequest:
    """Check a ``/v1/embeddings`` body: ``input`` is a string, a list of strings, a list of token ids,
    or a list of such lists; none may be empty."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object.")
    unknown = sorted(set(body) - EMBEDDING_FIELDS)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    if "input" not in body:
        raise _bad("'input' is required: a string, a list of strings, or lists of token ids.", "input")
    value = body["input"]
    texts: list[str] | None = None
    token_lists: list[list[int]] | None = None
    if isinstance(value, str):
        texts = [value]
    elif _is_token_list(value):
        token_lists = [value]
    elif isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        texts = value
    elif isinstance(value, list) and value and all(_is_token_list(item) for item in value):
        token_lists = value
    elif value == []:
        raise _bad("'input' is an empty list; send at least one text.", "input")
    else:
        raise _bad("'input' must be a string, a list of strings, a list of token ids, or a list of lists of "
                   "token ids (all non-empty).", "input")
    count = len(texts if texts is not None else token_lists or [])
    if count > max_inputs:
        raise _bad(f"'input' has {count} items; at most {max_inputs} fit in one request: send several.", "input")
    if texts is not None and any(not text for text in texts):
        raise _bad(f"'input' item {texts.index('')} is an empty string, which has no embedding.", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _bad("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    dimensions = _integer(body, "dimensions", 1)
    if "model" in body and not isinstance(body["model"], str):
        raise _bad("'model' must be a string.", "model")
    return EmbeddingRequest(texts, token_lists, encoding == "base64", dimensions)


def embedding_body(vectors: list[list[float]], model: str, prompt_tokens: int, *, base64: bool) -> dict:
    """The ``/v1/embeddings`` response: ``base64`` gives each vector as little-endian float32 bytes."""
    data = []
    for index, vector in enumerate(vectors):
        encoded: list[float] | str = vector
        if base64:
            packed = array.array("f", vector)
            if sys.byteorder == "big":
                packed.byteswap()
            encoded = b64encode(packed.tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}
