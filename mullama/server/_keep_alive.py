"""How long a served model stays loaded once idle: ollama's ``keep_alive`` (a number of seconds or a
duration such as ``"5m"``), the server's default, and the marker for a request that leaves it as it is."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from .._exceptions import InvalidConfigError

__all__ = ["DEFAULT_KEEP_ALIVE", "UNSET", "parse_keep_alive"]

DEFAULT_KEEP_ALIVE = 300.0  # seconds, as ollama
UNSET: Any = object()  # a request that gives no keep_alive: the model keeps the one it has

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_keep_alive(value: Any) -> float | None:
    """ollama's ``keep_alive``: seconds as a number, or a duration such as ``"5m"``, ``"1h30m"``, ``"10s"``;
    negative keeps the model loaded for ever (None), 0 unloads it as soon as the request ends.
    Absent: the model keeps the keep-alive it has (``UNSET``)."""
    if value is None:
        return UNSET
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        with contextlib.suppress(ValueError):
            seconds = float(text)
            return None if sign < 0 and seconds > 0 else seconds
        parts = _DURATION.findall(text)
        if not text or "".join(number + unit for number, unit in parts) != text:
            raise InvalidConfigError(f"keep_alive must be a number of seconds or a duration such as \"5m\", "
                                     f"not {value[:40]!r}.")
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
        return None if sign < 0 and seconds > 0 else seconds
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InvalidConfigError(f"keep_alive must be a number of seconds or a duration such as \"5m\", not {value!r}.")
    return None if value < 0 else float(value)
