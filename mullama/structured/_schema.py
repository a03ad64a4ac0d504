"""What ``json_schema=`` may be besides a JSON Schema: a pydantic model class (as OpenAI's SDK takes)."""

from __future__ import annotations

from typing import Any

from .._exceptions import InvalidConfigError

__all__ = ["schema_of"]


def schema_of(value: Any) -> Any:
    """The JSON Schema ``value`` stands for: ``value.model_json_schema()`` for an object that has one
    (a pydantic v2 model class, or one of its instances), else ``value`` itself (a dict, True, None;
    StreamConfig checks it). InvalidConfigError when ``model_json_schema()`` fails or returns no dict."""
    if isinstance(value, (dict, bool)) or value is None:
        return value
    method = getattr(value, "model_json_schema", None)
    if not callable(method):
        return value
    name = getattr(value, "__name__", type(value).__name__)
    try:
        schema = method()
    except Exception as exc:  # pydantic raises its own errors, e.g. for a type it cannot describe
        raise InvalidConfigError(f"json_schema: {name}.model_json_schema() failed: {exc}") from exc
    if not isinstance(schema, dict):
        raise InvalidConfigError(f"json_schema: {name}.model_json_schema() returned {type(schema).__name__}, "
                                 "not a JSON Schema dict.")
    return schema
