"""The globals and filters chat templates get, with limits: what llama.cpp and transformers give them.

Globals ``range``, ``lipsum``, ``raise_exception`` and ``strftime_now``; filters ``tojson`` (keeps
non-ASCII text, as upstream's), ``sum`` and ``list`` replaced; and ``limited_filter``, the wrapper
the sandbox puts around every filter, which checks the clock, sizes the input of filters that print
or go through it item by item, and counts what they build.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

from .._exceptions import TemplateError
from ._sandbox_limits import (
    BUDGET,
    BUILT,
    MAX_ITEMS,
    MAX_JSON_INDENT,
    SLOW_FILTER_INPUT,
    check_chars,
    check_items,
    check_width,
    over,
)
from ._sandbox_methods import check_replace
from ._sandbox_operators import check_percent
from ._sandbox_sizes import JSON, JSON_ASCII, check_text_args, materialize, text_size

__all__ = ["limited_filter", "limited_lipsum", "limited_list", "limited_range", "limited_sum", "raise_exception",
           "strftime_now", "tojson"]

_monotonic = time.monotonic


# --- globals ----------------------------------------------------------------------------

def raise_exception(message: Any) -> None:
    if not isinstance(message, str):
        text_size(message)
        message = str(message)
    if len(message) > 2000:
        message = message[:2000] + "…"
    raise TemplateError(f"the chat template refused the messages: {message}")


def strftime_now(format: str) -> str:
    if isinstance(format, str):
        check_chars(12 * len(format), "strftime_now()")  # '%c' writes 24 characters for 2
    return datetime.datetime.now().strftime(format)


def limited_range(*args: Any) -> range:
    result = range(*args)
    try:
        size = len(result)
    except OverflowError:
        size = MAX_ITEMS + 1
    check_items(size, "range()")
    return result


def limited_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    from jinja2.utils import generate_lorem_ipsum

    if isinstance(n, int) and isinstance(max, int):
        check_items(n * max, "lipsum() words")
    return generate_lorem_ipsum(n, html, min, max)


# --- filters ----------------------------------------------------------------------------

def tojson(value: Any, indent: int | str | None = None, ensure_ascii: bool = False,
           sort_keys: bool = False) -> str:
    text_size(value, JSON_ASCII if ensure_ascii else JSON)
    if indent is None:
        return json.dumps(value, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    if width > MAX_JSON_INDENT:
        raise over(f"tojson(indent={width}) is wider than {MAX_JSON_INDENT}", "MAX_JSON_INDENT")
    # json.dumps(..., indent=...) is this same Python-level encoder, joined at once; here each
    # chunk is counted, since indentation grows with the depth of the value.
    encoder = json.JSONEncoder(indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    parts, size, budget = [], 0, BUDGET.get()
    for chunk in encoder.iterencode(value):
        size += len(chunk)
        check_chars(size, "tojson")
        parts.append(chunk)
        if budget is not None and not len(parts) & 4095:
            budget.tick()
    return "".join(parts)


def limited_list(value: Any) -> list:
    return list(value)  # the limited wrapper has materialized and counted it


def limited_sum(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    from jinja2.filters import make_attrgetter

    items = materialize(iterable, "sum")
    if attribute is not None:
        getter = make_attrgetter(environment, attribute)
        items = [getter(item) for item in items]
    kind = list if isinstance(start, list) else tuple if isinstance(start, tuple) else None
    if kind is not None and all(isinstance(item, kind) for item in items):
        # sum() of lists copies the growing result at each step (quadratic); chain them instead
        check_items(len(start) + sum(len(item) for item in items), "sum()")
        return kind(itertools.chain(start, *items))
    return sum(items, start)


def _guard_center(value: Any, width: Any = 80) -> None:
    check_width(width, "center")


def _guard_indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> None:
    text = s if isinstance(s, str) else ""
    lines = text.count("\n") + 1
    check_items(lines, "indent (lines)")
    indent = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    check_chars(len(text) + lines * max(indent, 0), "indent")


def _guard_replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    text, old, new = (v if isinstance(v, str) else str(v) for v in (s, old, new))
    check_replace(text, old, new, -1 if count is None else count)


def _guard_format(value: Any, *args: Any, **kwargs: Any) -> None:
    check_percent(value if isinstance(value, str) else str(value), kwargs or args)


def _guard_wordwrap(s: Any, width: Any = 79, break_long_words: bool = True, wrapstring: Any = None,
                    break_on_hyphens: bool = True) -> None:
    text = s if isinstance(s, str) else ""
    if isinstance(width, int) and width > 0 and isinstance(wrapstring, str):
        lines = len(text) // width + text.count("\n") + 1
        check_chars(len(text) + lines * len(wrapstring), "wordwrap")


def _guard_batch(value: Any, linecount: Any, fill_with: Any = None) -> None:
    if isinstance(linecount, int):
        check_items(linecount, "batch")


def _guard_slice(value: Any, slices: Any, fill_with: Any = None) -> None:
    if isinstance(slices, int):
        check_items(slices, "slice")


def _guard_join(value: Any, d: Any = "", attribute: Any = None) -> None:
    if isinstance(value, str):
        check_chars(len(value) * (1 + text_size(d)), "join")
        return
    size = text_size(d) * max(len(value) - 1, 0)
    for item in value:
        size += text_size(item)  # with attribute=, the whole item: an upper bound
        check_chars(size, "join")


_FILTER_GUARDS: dict[str, Callable[..., None]] = {
    "center": _guard_center, "indent": _guard_indent, "replace": _guard_replace,
    "format": _guard_format, "wordwrap": _guard_wordwrap, "batch": _guard_batch,
    "slice": _guard_slice, "join": _guard_join,
}
# Filters that print their arguments (str() of a list prints every item).
_TEXT_FILTERS = frozenset({"capitalize", "center", "e", "escape", "forceescape", "format", "indent",
                           "lower", "pprint", "replace", "safe", "string", "striptags", "title", "trim",
                           "truncate", "upper", "urlencode", "urlize", "wordcount", "wordwrap"})
# Filters that go through their input item by item in Python (a string: character by character).
_ITEM_FILTERS = frozenset({"batch", "dictsort", "groupby", "join", "list", "map", "max", "min",
                           "reject", "rejectattr", "reverse", "select", "selectattr", "slice", "sort",
                           "sum", "unique"})
# Filters that return (a part of) their input rather than something new.
_SELECTING_FILTERS = frozenset({"attr", "d", "default", "first", "last", "max", "min", "random"})


def limited_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    offset = 1 if hasattr(func, "jinja_pass_arg") else 0  # context, eval context or environment first
    guard = _FILTER_GUARDS.get(name)
    textual = name in _TEXT_FILTERS
    itemwise = name in _ITEM_FILTERS
    slow = SLOW_FILTER_INPUT.get(name)
    counted = name not in _SELECTING_FILTERS

    def limited(*args: Any, **kwargs: Any) -> Any:
        budget = BUDGET.get()
        if budget is not None and _monotonic() > budget.deadline:
            budget.tick()
        if len(args) > offset:
            value = args[offset]
            if itemwise:
                if not isinstance(value, str):
                    args = (*args[:offset], materialize(value, f"the {name} filter"), *args[offset + 1:])
                elif name not in ("join", "reverse"):
                    check_items(len(value), f"the {name} filter")
            if textual:
                check_text_args(args[offset:], kwargs)
            if slow is not None:
                size = len(value) if isinstance(value, str) else text_size(value)
                if size > slow:
                    raise over(f"the {name} filter on more than {slow:,} characters", "SLOW_FILTER_INPUT")
            if guard is not None:
                guard(*args[offset:], **kwargs)
        result = func(*args, **kwargs)
        if (budget is not None and counted and isinstance(result, BUILT)
                and (len(args) <= offset or result is not args[offset])):
            budget.build(len(result))
        return result

    return functools.update_wrapper(limited, func)  # keeps jinja's pass_context & co. markers

