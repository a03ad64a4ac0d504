"""The string methods a chat template may call that can grow a string or a list, sized first.

``center``, ``ljust``, ``rjust``, ``zfill``, ``expandtabs``, ``join``, ``replace``, ``translate``,
``split``, ``rsplit`` and ``splitlines`` of ``str`` and ``bytes`` (Markup's are Python's): the
sandbox's ``call`` hook runs them through TEXT_METHODS, which refuses a call whose result would
pass MAX_OUTPUT_CHARS or MAX_ITEMS before making it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ._sandbox_limits import MAX_ITEMS, check_chars, check_items, check_width
from ._sandbox_sizes import materialize

__all__ = ["TEXT_METHODS", "check_replace"]

_LINE_BREAKS = ("\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def check_replace(text: Any, old: Any, new: Any, count: Any) -> None:
    kind = str if isinstance(text, str) else bytes if isinstance(text, bytes) else None
    if kind is None or not isinstance(old, kind) or not isinstance(new, kind) or not isinstance(count, int):
        return
    occurrences = text.count(old) if old else len(text) + 1
    if count >= 0:
        occurrences = min(occurrences, count)
    check_chars(len(text) + occurrences * (len(new) - len(old)), "replace()")


def _call_pad(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:  # center ljust rjust zfill
    if args:
        check_width(args[0], f"{method.__name__}()")
    return method(*args, **kwargs)


def _call_expandtabs(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:
    tabsize = args[0] if args else kwargs.get("tabsize", 8)
    if isinstance(tabsize, int):
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        check_chars(len(owner) + tabs * max(tabsize, 0), "expandtabs()")
    return method(*args, **kwargs)


def _call_join(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:
    if len(args) != 1 or kwargs:
        return method(*args, **kwargs)
    items = args[0]
    if isinstance(items, (str, bytes)):
        check_chars(len(items) + len(owner) * max(len(items) - 1, 0), "join()")
        return method(items)
    items = materialize(items, "join()")
    size = len(owner) * max(len(items) - 1, 0)
    for item in items:
        size += len(item) if isinstance(item, (str, bytes)) else 0
    check_chars(size, "join()")
    return method(items)


def _call_replace(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:
    if len(args) >= 2:
        check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    return method(*args, **kwargs)


def _call_translate(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:
    if args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        check_chars(len(owner) * max(longest, 1), "translate()")
    return method(*args, **kwargs)


def _call_split(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:  # split rsplit
    if len(owner) <= MAX_ITEMS or len(args) > 2 or not set(kwargs) <= {"sep", "maxsplit"}:
        return method(*args, **kwargs)
    sep = args[0] if args else kwargs.get("sep")
    maxsplit = args[1] if len(args) > 1 else kwargs.get("maxsplit", -1)
    if not isinstance(maxsplit, int) or 0 <= maxsplit < MAX_ITEMS:
        return method(*args, **kwargs)
    parts = method(sep, MAX_ITEMS)
    check_items(len(parts), f"{method.__name__}()")
    return parts


def _call_splitlines(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:
    if len(owner) > MAX_ITEMS:
        if isinstance(owner, str):
            lines = sum(owner.count(c) for c in _LINE_BREAKS) - owner.count("\r\n")
        else:
            lines = owner.count(b"\n") + owner.count(b"\r") - owner.count(b"\r\n")
        check_items(lines + 1, "splitlines()")
    return method(*args, **kwargs)


TEXT_METHODS: dict[str, Callable[[Any, Any, tuple, dict], Any]] = {
    "center": _call_pad, "ljust": _call_pad, "rjust": _call_pad, "zfill": _call_pad,
    "expandtabs": _call_expandtabs, "join": _call_join, "replace": _call_replace,
    "translate": _call_translate, "split": _call_split, "rsplit": _call_split,
    "splitlines": _call_splitlines,
}


