"""ollama's API wire format (``/api/chat``, ``/api/generate``, ``/api/embed``, ...): requests in,
NDJSON lines and bodies out, translated to and from the OpenAI-shaped request the engine
serves (no I/O). As ollama: streaming is the default, the prompt of ``/api/generate`` goes
through the model's chat template unless ``raw``, ``options`` carry the sampling settings,
``format`` is ``"json"`` or a JSON schema, durations are nanoseconds, errors are ``{"error": ...}``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ._config import StreamConfig
from ._exceptions import InvalidConfigError
from ._openai import APIError, ParsedRequest, _bad

__all__ = ["chat_line", "done_line", "error_body", "parse_chat", "parse_generate", "timestamp"]

VERSION = "0.13.0"  # the ollama API version whose shapes these are
# ollama option -> StreamConfig field (options not listed, such as num_ctx or num_thread, are server settings)
OPTIONS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "seed": "seed",
           "stop": "stop_sequences", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "typical_p": "typical_p",
           "mirostat": "mirostat", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta"}
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}  # ollama's own


def error_body(exc: APIError) -> dict:
    return {"error": exc.message}


def _config(body: dict, max_tokens_limit: int) -> StreamConfig:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise _bad("options must be an object.")
    fields: dict[str, Any] = {"timeout_ms": None, **DEFAULTS}
    for name, value in options.items():
        if name in OPTIONS and value is not None:
            fields[OPTIONS[name]] = value if name != "stop" or isinstance(value, list) else [value]
    predict = options.get("num_predict")
    if predict is not None and (isinstance(predict, bool) or not isinstance(predict, int)):
        raise _bad("options.num_predict must be an integer (-1: as many as fit).")
    fields["max_tokens"] = max_tokens_limit if predict is None or predict < 0 else min(max(predict, 1),
                                                                                        max_tokens_limit)
    fmt = body.get("format")
    if fmt == "json":
        fields["json_schema"] = {"type": "object"}
    elif isinstance(fmt, dict):
        fields["json_schema"] = fmt
    elif fmt not in (None, ""):
        raise _bad("format must be \"json\" or a JSON schema object.")
    try:
        return StreamConfig(**fields)
    except InvalidConfigError as exc:
        raise _bad(str(exc)) from None
    except TypeError as exc:
        raise _bad(f"an option has the wrong type: {exc}") from None


def _stream(body: dict) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false.")
    return stream


def _messages(messages: Any) -> list[dict]:
    """ollama messages as OpenAI-shaped ones (tool call arguments as JSON text)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content}.")
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad(f"messages[{index}] needs a role.")
        if message.get("images"):
            raise _bad(f"messages[{index}]: images are not supported by this model.")
        entry: dict[str, Any] = {"role": message["role"], "content": message.get("content") or ""}
        calls = message.get("tool_calls")
        if calls:
            entry["tool_calls"] = [{"id": f"call_{number}", "type": "function", "function": {
                "name": (call.get("function") or {}).get("name"),
                "arguments": json.dumps((call.get("function") or {}).get("arguments") or {}, ensure_ascii=False)}}
                for number, call in enumerate(calls) if isinstance(call, dict)]
        result.append(entry)
    return result


def parse_chat(body: Any, *, max_tokens_limit: int) -> ParsedRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object.")
    tools = body.get("tools") or None
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools must be a list.")
    return ParsedRequest("chat", _config(body, max_tokens_limit), _stream(body), False,
                         messages=_messages(body.get("messages")), tools=tools)


def parse_generate(body: Any, *, max_tokens_limit: int) -> ParsedRequest:
    """``/api/generate``: the prompt through the chat template (with ``system``) unless ``raw``."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object.")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt must be a non-empty string.")
    if body.get("template"):
        raise _bad("template overrides are Go templates, which mullama does not run; start the server with "
                   "--chat-template-file (Jinja), or send raw: true with a prompt you formatted.")
    if body.get("images") or body.get("suffix"):
        raise _bad("images and suffix are not supported.")
    config, stream = _config(body, max_tokens_limit), _stream(body)
    if body.get("raw"):
        return ParsedRequest("completion", config, stream, False, prompt=prompt)
    system = body.get("system")
    messages = ([{"role": "system", "content": system}] if isinstance(system, str) and system else [])
    return ParsedRequest("chat", config, stream, False, messages=[*messages, {"role": "user", "content": prompt}])


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1_000_000:06d}Z"


def chat_line(kind: str, model: str, text: str = "", tool_calls: list[Any] | None = None) -> dict:
    """One streamed piece: ``message`` for /api/chat, ``response`` for /api/generate."""
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            message["tool_calls"] = [{"function": {"name": call.name, "arguments": json.loads(call.arguments)}}
                                     for call in tool_calls]
        return {"model": model, "created_at": timestamp(), "message": message, "done": False}
    return {"model": model, "created_at": timestamp(), "response": text, "done": False}


def done_line(kind: str, model: str, job: Any, started: float, text: str = "", tool_calls: list[Any] | None = None
              ) -> dict:
    """The last line (or the whole non-streamed body): the reason and ollama's statistics."""
    line = chat_line(kind, model, text, tool_calls)
    sequence = job._sequence
    prompt_seconds = job.prompt_seconds() or 0.0
    first, last = sequence.first_token, sequence.last_token
    line.update(done=True, done_reason="length" if job.finish_reason == "length" else "stop",
                total_duration=int((time.perf_counter() - started) * 1e9), load_duration=0,
                prompt_eval_count=job.prompt_tokens, prompt_eval_duration=int(prompt_seconds * 1e9),
                eval_count=job.completion_tokens,
                eval_duration=int(((last - first) if first is not None and last is not None else 0.0) * 1e9))
    return line
