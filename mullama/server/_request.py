"""The server's one internal request type, and the error every wire format shares.

Each wire format (OpenAI, Anthropic, ollama, the Responses API) parses its body into a ``ParsedRequest``
and raises ``APIError`` for anything it refuses; the server generates from the former and answers the
latter in the format's own error shape (each format declares its own, see ``_http.WireFormat``),
never as a 5xx. Nothing here is any one format's shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import InvalidConfigError, MullamaError
from ..generate._config import StreamConfig, named_for_the_caller

__all__ = ["APIError", "ParsedRequest", "bad", "boolean", "capped_max_tokens", "check_fields", "config_error",
           "generation_error", "integer", "json_schema_constraint", "number"]


class APIError(Exception):
    """A request the server refuses: its HTTP status, a message, and the field at fault (``param``), a
    kind of error (``type``) and a machine-readable ``code``, which each format's error shape picks from."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code


def generation_error(exc: MullamaError) -> APIError:
    """The response for a request whose generation failed after it was accepted."""
    if exc.code == "STREAM_TIMEOUT":
        return APIError(408, str(exc), type="timeout_error", code="stream_timeout")
    if exc.code == "ENGINE_FAILED":
        return APIError(503, str(exc), type="server_error", code="engine_failed")
    if exc.code == "CONTEXT_OVERFLOW":
        return APIError(400, str(exc), code="context_length_exceeded")
    if exc.code == "MODEL_NOT_FOUND":
        return APIError(404, str(exc), type="not_found_error", param="model", code="model_not_found")
    return APIError(500, str(exc), type="server_error", code=exc.code.lower())


@dataclass
class ParsedRequest:
    kind: str  # "chat" or "completion"
    config: StreamConfig
    stream: bool
    include_usage: bool
    messages: list | None = None
    prompts: list[str | list[int]] = field(default_factory=list)  # a completion's prompts: text or token ids
    n: int = 1  # choices, each its own sequence
    tools: list | None = None
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    reasoning_format: str = "auto"
    model: str | None = None  # the request's ``model`` field: which served model answers it
    id_slot: int | None = None  # llama-server's id_slot: the engine slot to run in (None: any)
    chat_template_kwargs: dict | None = None  # the template's extra variables (llama-server's field)
    echo: bool = False  # a completion's text (and logprobs) start with its prompt (OpenAI's echo)
    think: bool = False  # ollama's ``think``: the model must be able to think (its template has a thought)
    truncate: bool = False  # ollama's: a chat too long for the context loses its oldest messages (_truncation)
    legacy_functions: bool = False  # OpenAI's deprecated functions: the answer's call as function_call
    context: list[int] | None = None  # ollama's /api/generate context: the tokens the prompt continues
    suffix: str | None = None  # ollama's and OpenAI's completion suffix: the prompt is the prefix of an infill
    # StreamConfig field -> the request's field that set it (see config_error); a field not named is its own
    field_names: Mapping[str, str] = field(default_factory=dict)

    def choice_configs(self, config: StreamConfig | None = None) -> list[StreamConfig]:
        """One config per choice (from ``config``, else the request's): with a seed, choice i samples
        with seed + i (so choices differ)."""
        config = config or self.config
        seed = config.seed
        if self.n == 1 or seed is None:
            return [config] * self.n
        return [config.with_options(seed=(seed + i) % (2**32 - 1)) for i in range(self.n)]


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def check_fields(body: dict, known: Set[str]) -> None:
    """OpenAI's 400 for the first field (by name) a route does not know. A field sent as null is taken as
    absent, whatever its name: clients that write out every field of their own model send null for the
    ones not set."""
    unknown = sorted(name for name in set(body) - known if body[name] is not None)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])


def config_error(exc: InvalidConfigError, field_names: Mapping[str, str] | None = None) -> APIError:
    """The 400 for a setting the library refused (a StreamConfig built from a request, or a sampler set up
    for it): a message that names the request's own field (``field_names``: StreamConfig field -> the
    wire's name, such as ``options.temperature``), never the library's class, and that field as
    ``param``. Every wire format translates the library's refusals here."""
    message, name = named_for_the_caller(exc, field_names or {})
    return APIError(400, message, param=name)


def capped_max_tokens(requested: int | None, limit: int) -> int:
    """Every route's rule for how many tokens to generate: what the request asks, capped silently at the
    server's ``--max-tokens-limit``; that limit when it asks for none (None, or a negative count: as
    many as fit)."""
    return limit if requested is None or requested < 0 else min(requested, limit)


def boolean(body: dict, name: str, default: bool) -> bool:
    """A true/false field of a request; absent or null, ``default``: OpenAI's spec marks such fields
    nullable, and ollama's server reads a null as unset."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false.", name)
    return value


def json_schema_constraint(schema: Any, param: str) -> dict[str, Any]:
    """A JSON Schema a request constrains its answer with, as the StreamConfig field that does it. As
    llama-server: an empty schema asks for a JSON object (the converter would allow any value)."""
    if not isinstance(schema, (dict, bool)):
        raise bad(f"'{param}' must be a JSON Schema object.", param)
    return {"json_schema": {"type": "object"} if schema == {} else schema}


def number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise bad(f"'{name}' must be a number from {low} to {high}.", name)
    return float(value)


def integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise bad(f"'{name}' must be an integer {bound}.", name)
    return value


def requested_slot(body: dict) -> int | None:
    """llama-server's ``id_slot``: the engine slot a request runs in, taken modulo the slots; -1 (its
    default) or another negative number, any slot."""
    value = integer(body, "id_slot", -(2**31), 2**31 - 1)
    return None if value is None or value < 0 else value
