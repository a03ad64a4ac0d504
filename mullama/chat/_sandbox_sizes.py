"""How long a value would be once printed, found without printing it; and iterables made sized.

The chat-template sandbox sizes a value from its parts before ``str()``, ``repr()`` or JSON build it
(``{{ [s] * 1000 }}`` with a 9 MB ``s`` is refused, not attempted), and turns an iterable into a
list of at most MAX_ITEMS items before a filter or method goes through it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence, Sized
from typing import Any

from ._sandbox_limits import BUDGET, MAX_ITEMS, MAX_OUTPUT_CHARS, check_chars, check_items

__all__ = ["ASCII", "JSON", "JSON_ASCII", "PLAIN_TYPES", "REPR", "STR", "add_container", "check_text_args",
           "materialize", "namespace_attrs", "text_size"]

_ITEMS_VIEW: type = type({}.items())
_CONTAINERS: tuple[type, ...] = (list, tuple, set, frozenset, Mapping, type({}.keys()), type({}.values()),
                                 _ITEMS_VIEW)  # + jinja2.utils.Namespace, added by add_container()
PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


def add_container(kind: type) -> None:
    """Measure ``kind`` item by item too (jinja2's Namespace: added once jinja2 is imported)."""
    global _CONTAINERS
    if kind not in _CONTAINERS:
        _CONTAINERS = (*_CONTAINERS, kind)


# The modes of text_size(): str(), repr(), ascii(), json.dumps() and json.dumps(ensure_ascii=True).
STR, REPR, ASCII, JSON, JSON_ASCII = range(5)


_DROP_WHITESPACE = {ord("\n"): None, ord("\r"): None, ord("\t"): None}
_RARE_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _quoted_size(text: str, mode: int) -> int:
    """An upper bound of len(repr(text)) (REPR, ASCII) or len(json.dumps(text)) (JSON, JSON_ASCII)."""
    size = len(text) + text.count('"') + text.count("'") + text.count("\\") + 2
    if text.isprintable() and (mode in (REPR, JSON) or text.isascii()):
        return size
    if mode == REPR or mode == ASCII:  # \n \r \t take 2 characters, anything else up to 10
        if mode == REPR and text.translate(_DROP_WHITESPACE).isprintable():
            return size + text.count("\n") + text.count("\r") + text.count("\t")
        return 10 * len(text) + 2
    # JSON: \n \r \t (\b \f) take 2 characters, other control characters 6; with ensure_ascii,
    # any other non-ASCII character up to 12
    size += text.count("\n") + text.count("\r") + text.count("\t") + 5 * _RARE_CONTROLS.subn("", text)[1]
    if mode == JSON_ASCII and not text.isascii():
        size += 11 * _NON_ASCII.subn("", text)[1]
    return size


def _leaf_size(value: Any, mode: int) -> int | None:
    """The length of ``value`` printed in ``mode`` (an upper bound), or None for a container."""
    if isinstance(value, str):
        return len(value) if mode == STR else _quoted_size(value, mode)
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, int):
        return value.bit_length() // 3 + 2  # decimal digits are at most bits * 0.302 + 1
    if isinstance(value, float):
        return 24
    if isinstance(value, (bytes, bytearray)):
        return 4 * len(value) + 3
    if isinstance(value, _CONTAINERS):
        return None
    return 100  # jinja's own objects (Undefined, Macro, LoopContext, ...) print a short repr


def _children(value: Any) -> Iterable[Any]:
    if isinstance(value, Mapping):
        return itertools.chain(value.keys(), value.values())
    if type(value).__name__ == "Namespace":  # prints as <Namespace {...}>
        attrs = namespace_attrs(value)
        return () if attrs is None else (attrs,)
    if isinstance(value, _ITEMS_VIEW):
        return itertools.chain.from_iterable(value)  # type: ignore[arg-type]
    return value  # type: ignore[no-any-return]


def namespace_attrs(namespace: Any) -> dict | None:
    """A jinja2 namespace's values (jinja2 3.1 keeps them in a private ``__attrs`` dict)."""
    try:
        attrs = object.__getattribute__(namespace, "_Namespace__attrs")
    except AttributeError:
        return None
    return attrs if isinstance(attrs, dict) else None


def text_size(value: Any, mode: int = STR) -> int:
    """An upper bound of ``len(str(value))`` (or of its repr / JSON), from the sizes of its parts,
    without building it; a sub-container is measured once however often it recurs (``[s] * 1000``
    is one string, printed a thousand times). TemplateError past MAX_OUTPUT_CHARS."""
    size = _leaf_size(value, mode)
    if size is not None:
        check_chars(size, "printing a value")
        return size
    child_mode = REPR if mode == STR else mode
    sizes: dict[int, int] = {}  # id -> printed size; 5 while in progress (a cycle prints as [...])
    stack: list[tuple[Any, tuple[int, list[Any]] | None]] = [(value, None)]
    budget, visited = BUDGET.get(), 0
    while stack:
        node, pending = stack.pop()
        if pending is None:
            if id(node) in sizes:
                continue
            sizes[id(node)] = 5
            total, containers = 16, []
            for child in _children(node):
                leaf = _leaf_size(child, child_mode)
                if leaf is None:
                    containers.append(child)
                    leaf = 0
                total += leaf + 2
                visited += 1
                if total > MAX_OUTPUT_CHARS:
                    check_chars(total, "printing a value")
                if budget is not None and not visited & 4095:
                    budget.tick()
            stack.append((node, (total, containers)))
            stack.extend((child, None) for child in containers if id(child) not in sizes)
        else:
            total, containers = pending
            for child in containers:
                total += sizes[id(child)]
            check_chars(total, "printing a value")
            sizes[id(node)] = total
    return sizes[id(value)]


def check_text_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for arg in itertools.chain(args, kwargs.values()):
        if type(arg) not in PLAIN_TYPES:
            text_size(arg)


def materialize(value: Any, what: str) -> Any:
    """``value`` if it has a length within MAX_ITEMS (or is no iterable: the caller decides), else
    its items as a list (at most MAX_ITEMS)."""
    if isinstance(value, Sized):
        check_items(len(value), what)
        return value
    if not isinstance(value, Iterable):
        return value
    budget, items = BUDGET.get(), []
    for item in value:
        items.append(item)
        if len(items) > MAX_ITEMS:
            check_items(len(items), what)
        if budget is not None and not len(items) & 1023:
            budget.tick()
    return items

