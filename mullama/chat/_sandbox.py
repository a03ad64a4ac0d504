"""The sandbox chat templates render in: jinja2's, with resource limits (model files may be hostile).

Templates come from model files, which may be hostile. They run in jinja2's
ImmutableSandboxedEnvironment, which refuses access to Python internals and mutation of
the inputs, extended here with resource limits (see "Limits" below): a template that
loops forever, builds a gigabyte string or list, or formats with a huge width is stopped
before it does, with a TemplateError that names the limit. Any other failure is a
TemplateError too. The environment mirrors what llama.cpp (and Hugging Face
transformers) give templates: ``trim_blocks`` and ``lstrip_blocks``, loop controls,
``{% generation %}`` blocks (rendered as their body), ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text, and the variables
``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt`` and
``enable_thinking``.

Limits. Each breach raises TemplateError naming the constant:

- time: MAX_RENDER_SECONDS of wall clock per render, checked at every loop iteration,
  call, filter, item lookup and output chunk;
- work: MAX_LOOP_ITERATIONS for-loop iterations per render, all loops together, and
  MAX_TEMPLATE_CHARS of template source (compiled once per template);
- both grow with the conversation, by SECONDS_PER_MESSAGE_PAIR and one iteration for each
  pair of messages (n * (n - 1) for n messages), because real templates may compare every
  message with every earlier one (Gemma 4's does: 1,400 messages are 980,000 iterations); a
  hostile template can thus spend on a conversation what such a template would, no more;
- size: MAX_OUTPUT_CHARS characters for the prompt and for any one string a template
  builds, MAX_ITEMS items for ``range()`` and any one list, MAX_INT_BITS bits for
  integers built with ``*`` and ``**``;
- memory: MAX_RENDER_MEMORY of growth of the process's anonymous memory during a render,
  measured (``/proc/self/statm``) after every MEMORY_CHECK_EVERY characters and items of
  new strings and lists the template builds; so a template that rebuilds a growing string
  (Reka-Edge's appends each message to ``ns.out``) churns freely, and one that keeps copies
  is stopped. Without ``/proc`` (not Linux), what the template built counts as if it all
  stayed alive.

Sizes are checked *before* the work: ``[0] * 10**8``, ``'x'.ljust(10**9)``,
``'%999999999s' % x``, ``10 ** (10**8)`` or ``','.join(huge)`` compute the result's size
from their operands and refuse; printing a value (``{{ x }}``, ``~``, ``%``, ``format``,
filters) sizes it from its parts first, so ``{{ [s] * 1000 }}`` with a 9 MB ``s`` is refused,
not attempted. Every ``for`` loop, slice and ``~`` concatenation is instrumented by
rewriting the parsed template (public ``jinja2.nodes`` API); operators ``+ * ** %`` use the
sandbox's ``intercepted_binops`` hook; calls of the string methods that can grow a string
(``center``, ``ljust``, ``rjust``, ``zfill``, ``expandtabs``, ``join``, ``replace``,
``translate``, ``format``, ``split``...) are checked in the sandbox's ``call`` hook; filters
are wrapped. ``RecursionError`` and ``MemoryError`` become TemplateError as well.
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import mmap
import re
import string
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from contextvars import ContextVar
from typing import Any

from .._exceptions import TemplateError

__all__ = ["MAX_OUTPUT_CHARS", "render"]

# Why these values: the 70 upstream templates (llama.cpp's models/templates) render a short
# conversation with at most 12 loop iterations and 25,000 characters and items of new strings and
# lists; a 401-message, 2-million-character one in at most 0.9 s with at most 81,000 iterations
# (Gemma 4) and 814 million characters built and freed again (Reka-Edge rebuilds its prompt at
# each message, so its memory barely grows); their sources are at most 17 KB. Each limit leaves
# a margin of orders of magnitude; a conversation that reaches one is far past any model's context.
MAX_OUTPUT_CHARS = 10_000_000       # the rendered prompt, and any one string a template builds
MAX_ITEMS = 100_000                 # range() (jinja's own default), and any one list, tuple or dict
MAX_LOOP_ITERATIONS = 1_000_000     # for-loop iterations in one render, all loops together (+ n*(n-1))
MAX_RENDER_MEMORY = 128 * 2**20     # growth of anonymous memory during one render
MEMORY_CHECK_EVERY = 4_000_000      # measured after this many characters and items of new strings and lists
MAX_INT_BITS = 65_536               # integers built with * and ** (Python prints at most 4,300 digits)
MAX_RENDER_SECONDS = 2.0            # wall clock for one render (+ n*(n-1) * SECONDS_PER_MESSAGE_PAIR)
SECONDS_PER_MESSAGE_PAIR = 2e-6     # Gemma 4's template needs 0.7 us per pair here (1,400 messages: 1.4 s)
MAX_TEMPLATE_CHARS = 200_000        # the template's source (compiling costs ~15 ms per KiB; done once)
MAX_JSON_INDENT = 100               # tojson(indent=...)
# Filters that do per-character Python work on their input: at most this much input, so that
# one call stays well under a second (striptags is quadratic in markupsafe 3.0).
SLOW_FILTER_INPUT = {"striptags": 100_000, "urlize": 100_000, "title": 1_000_000,
                     "wordwrap": 1_000_000, "urlencode": 1_000_000, "pprint": 1_000_000}


_SEQUENCES = (str, bytes, list, tuple)
_BUILT = (str, bytes, list, tuple, dict)  # what counts towards MEMORY_CHECK_EVERY (by its len())
_METHOD_TYPES = (types.BuiltinMethodType, types.MethodType)
_DICT_ATTRIBUTES = frozenset(dir(dict))
_MISSING = object()
_monotonic = time.monotonic
_ITEMS_VIEW: type = type({}.items())
_CONTAINERS: tuple[type, ...] = (list, tuple, set, frozenset, Mapping, type({}.keys()), type({}.values()),
                                 _ITEMS_VIEW)  # + jinja2.utils.Namespace, added by _environment_class()
_PLAIN_TYPES = frozenset({str, int, float, bool, type(None)})


def _over(limit: str, name: str) -> TemplateError:
    return TemplateError(f"the chat template went over a safety limit: {limit} ({name}). No real chat "
                         "template needs that much; the model file's template is broken or hostile.")


class _Budget:
    """What one render has spent: time, loop iterations, new strings and lists."""

    __slots__ = ("baseline", "built", "deadline", "iterations", "max_iterations", "next_check", "seconds")

    def __init__(self, messages: int = 0) -> None:
        pairs = messages * (messages - 1)
        self.seconds = MAX_RENDER_SECONDS + pairs * SECONDS_PER_MESSAGE_PAIR
        self.deadline = time.monotonic() + self.seconds
        self.iterations = 0
        self.max_iterations = MAX_LOOP_ITERATIONS + pairs
        self.built = 0  # characters and items of new strings and lists, freed or not
        self.next_check = MEMORY_CHECK_EVERY
        self.baseline: int | None = None  # anonymous memory before the render, once measured

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _over(f"more than {self.seconds:.3g} s of rendering", "MAX_RENDER_SECONDS")

    def check_iterations(self) -> None:
        if self.iterations > self.max_iterations:
            raise _over(f"more than {self.max_iterations:,} loop iterations", "MAX_LOOP_ITERATIONS")
        self.tick()

    def build(self, size: int) -> None:
        self.built += size
        if self.built > self.next_check:
            self.check_memory()

    def check_memory(self) -> None:
        self.next_check = self.built + MEMORY_CHECK_EVERY
        now = _anonymous_memory()
        if now is None:
            grown = self.built  # no /proc: as if everything built were still alive (a byte each)
        else:
            if self.baseline is None:  # first measured now: as if everything built so far were alive
                self.baseline = now - self.built
            grown = now - self.baseline
        if grown > MAX_RENDER_MEMORY:
            raise _over(f"more than {MAX_RENDER_MEMORY // 2**20} MiB of memory", "MAX_RENDER_MEMORY")


def _anonymous_memory() -> int | None:
    """This process's resident anonymous memory (not the mapped model file), or None without /proc."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            fields = statm.read().split()
        return (int(fields[1]) - int(fields[2])) * mmap.PAGESIZE  # resident - shared (file-backed)
    except (OSError, ValueError, IndexError):
        return None


# The budget of the render running in this thread (None outside a render, e.g. while compiling).
_BUDGET: ContextVar[_Budget | None] = ContextVar("mullama_template_budget", default=None)


def _built(value: Any) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.build(len(value))


def _check_chars(size: int, what: str) -> None:
    if size > MAX_OUTPUT_CHARS:
        raise _over(f"{what} would make a string of more than {MAX_OUTPUT_CHARS:,} characters",
                    "MAX_OUTPUT_CHARS")


def _check_items(size: int, what: str) -> None:
    if size > MAX_ITEMS:
        raise _over(f"{what} would make more than {MAX_ITEMS:,} items", "MAX_ITEMS")


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int) and width > MAX_OUTPUT_CHARS:
        _check_chars(width, what)


# --- how long would str(value) be? ---------------------------------------------------------

_STR, _REPR, _ASCII, _JSON, _JSON_ASCII = range(5)


_DROP_WHITESPACE = {ord("\n"): None, ord("\r"): None, ord("\t"): None}
_RARE_CONTROLS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def _quoted_size(text: str, mode: int) -> int:
    """An upper bound of len(repr(text)) (_REPR, _ASCII) or len(json.dumps(text)) (_JSON, _JSON_ASCII)."""
    size = len(text) + text.count('"') + text.count("'") + text.count("\\") + 2
    if text.isprintable() and (mode in (_REPR, _JSON) or text.isascii()):
        return size
    if mode == _REPR or mode == _ASCII:  # \n \r \t take 2 characters, anything else up to 10
        if mode == _REPR and text.translate(_DROP_WHITESPACE).isprintable():
            return size + text.count("\n") + text.count("\r") + text.count("\t")
        return 10 * len(text) + 2
    # JSON: \n \r \t (\b \f) take 2 characters, other control characters 6; with ensure_ascii,
    # any other non-ASCII character up to 12
    size += text.count("\n") + text.count("\r") + text.count("\t") + 5 * _RARE_CONTROLS.subn("", text)[1]
    if mode == _JSON_ASCII and not text.isascii():
        size += 11 * _NON_ASCII.subn("", text)[1]
    return size


def _leaf_size(value: Any, mode: int) -> int | None:
    """The length of ``value`` printed in ``mode`` (an upper bound), or None for a container."""
    if isinstance(value, str):
        return len(value) if mode == _STR else _quoted_size(value, mode)
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
        attrs = _namespace_attrs(value)
        return () if attrs is None else (attrs,)
    if isinstance(value, _ITEMS_VIEW):
        return itertools.chain.from_iterable(value)  # type: ignore[arg-type]
    return value  # type: ignore[no-any-return]


def _namespace_attrs(namespace: Any) -> dict | None:
    """A jinja2 namespace's values (jinja2 3.1 keeps them in a private ``__attrs`` dict)."""
    try:
        attrs = object.__getattribute__(namespace, "_Namespace__attrs")
    except AttributeError:
        return None
    return attrs if isinstance(attrs, dict) else None


def _text_size(value: Any, mode: int = _STR) -> int:
    """An upper bound of ``len(str(value))`` (or of its repr / JSON), from the sizes of its parts,
    without building it; a sub-container is measured once however often it recurs (``[s] * 1000``
    is one string, printed a thousand times). TemplateError past MAX_OUTPUT_CHARS."""
    size = _leaf_size(value, mode)
    if size is not None:
        _check_chars(size, "printing a value")
        return size
    child_mode = _REPR if mode == _STR else mode
    sizes: dict[int, int] = {}  # id -> printed size; 5 while in progress (a cycle prints as [...])
    stack: list[tuple[Any, tuple[int, list[Any]] | None]] = [(value, None)]
    budget, visited = _BUDGET.get(), 0
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
                    _check_chars(total, "printing a value")
                if budget is not None and not visited & 4095:
                    budget.tick()
            stack.append((node, (total, containers)))
            stack.extend((child, None) for child in containers if id(child) not in sizes)
        else:
            total, containers = pending
            for child in containers:
                total += sizes[id(child)]
            _check_chars(total, "printing a value")
            sizes[id(node)] = total
    return sizes[id(value)]


def _check_text_args(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for arg in itertools.chain(args, kwargs.values()):
        if type(arg) not in _PLAIN_TYPES:
            _text_size(arg)


def _materialize(value: Any, what: str) -> Any:
    """``value`` if it has a length within MAX_ITEMS (or is no iterable: the caller decides), else
    its items as a list (at most MAX_ITEMS)."""
    if isinstance(value, Sized):
        _check_items(len(value), what)
        return value
    if not isinstance(value, Iterable):
        return value
    budget, items = _BUDGET.get(), []
    for item in value:
        items.append(item)
        if len(items) > MAX_ITEMS:
            _check_items(len(items), what)
        if budget is not None and not len(items) & 1023:
            budget.tick()
    return items


# --- operators ----------------------------------------------------------------------------

def _sequence_limit(seq: Any, size: int, what: str) -> None:
    if isinstance(seq, (str, bytes)):
        _check_chars(size, what)
    else:
        _check_items(size, what)


def _check_int_bits(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise _over(f"{what} would make an integer of more than {MAX_INT_BITS:,} bits", "MAX_INT_BITS")


def _check_multiply(left: Any, right: Any) -> None:
    if isinstance(right, int) and isinstance(left, _SEQUENCES):
        _sequence_limit(left, len(left) * right, "'*' repetition")
    elif isinstance(left, int) and isinstance(right, _SEQUENCES):
        _sequence_limit(right, len(right) * left, "'*' repetition")
    elif isinstance(left, int) and isinstance(right, int):
        _check_int_bits(left.bit_length() + right.bit_length(), "'*'")


def _check_add(left: Any, right: Any) -> None:
    if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        _sequence_limit(left, len(left) + len(right), "'+' concatenation")


def _check_power(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        _check_int_bits(abs(left).bit_length() * right, "'**'")


_PERCENT_SPEC = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.DOTALL)


def _check_percent(fmt: str | bytes, values: Any, factor: int = 1) -> None:
    """Refuse ``fmt % values`` if its result could pass MAX_OUTPUT_CHARS (widths included)."""
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    if "%" not in text:
        return
    mapping = values if isinstance(values, Mapping) else None
    positional = list(values) if isinstance(values, tuple) else [values]
    size, index, budget = len(text), 0, _BUDGET.get()
    for count, match in enumerate(_PERCENT_SPEC.finditer(text)):
        key, width, precision, conversion = match.groups()
        if conversion == "%":
            continue
        for part in (width, precision):
            if part == "*":
                star = positional[index] if index < len(positional) else 0
                index += 1
                size += abs(star) if isinstance(star, int) else 0
            elif part:
                size += int(part) if len(part) <= 9 else MAX_OUTPUT_CHARS + 1
        if key is not None:
            try:
                value = mapping[key] if mapping is not None else None
            except LookupError:
                value = None
        else:
            value = positional[index] if index < len(positional) else None
            index += 1
        mode = _REPR if conversion == "r" else _ASCII if conversion == "a" else _STR
        size += _text_size(value, mode) * factor
        if isinstance(value, float) and conversion in "dieEfFgG":
            size += 330  # '%f' % 1e308 prints all 309 digits
        _check_chars(size, "'%' formatting")
        if budget is not None and not count & 1023:
            budget.tick()


def _check_replace(text: Any, old: Any, new: Any, count: Any) -> None:
    kind = str if isinstance(text, str) else bytes if isinstance(text, bytes) else None
    if kind is None or not isinstance(old, kind) or not isinstance(new, kind) or not isinstance(count, int):
        return
    occurrences = text.count(old) if old else len(text) + 1
    if count >= 0:
        occurrences = min(occurrences, count)
    _check_chars(len(text) + occurrences * (len(new) - len(old)), "replace()")


# --- str.format ---------------------------------------------------------------------------

_FORMAT_NUMBERS = re.compile(r"\d+")


class _FormatLimits(string.Formatter):
    """Counts what str.format() writes, field by field, before writing it."""

    _chars = 0
    _factor = 1  # the escaping formatter (Markup.format) may write 6 characters for one

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion in ("r", "a"):
            _text_size(value, _REPR if conversion == "r" else _ASCII)
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        size = _text_size(value)
        for number in _FORMAT_NUMBERS.findall(format_spec):
            size += int(number) if len(number) <= 9 else MAX_OUTPUT_CHARS + 1
        self._chars += size * self._factor
        _check_chars(self._chars, "str.format()")
        return super().format_field(value, format_spec)


# --- the guarded calls --------------------------------------------------------------------

_LINE_BREAKS = ("\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def _call_pad(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:  # center ljust rjust zfill
    if args:
        _check_width(args[0], f"{method.__name__}()")
    return method(*args, **kwargs)


def _call_expandtabs(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:
    tabsize = args[0] if args else kwargs.get("tabsize", 8)
    if isinstance(tabsize, int):
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        _check_chars(len(owner) + tabs * max(tabsize, 0), "expandtabs()")
    return method(*args, **kwargs)


def _call_join(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:
    if len(args) != 1 or kwargs:
        return method(*args, **kwargs)
    items = args[0]
    if isinstance(items, (str, bytes)):
        _check_chars(len(items) + len(owner) * max(len(items) - 1, 0), "join()")
        return method(items)
    items = _materialize(items, "join()")
    size = len(owner) * max(len(items) - 1, 0)
    for item in items:
        size += len(item) if isinstance(item, (str, bytes)) else 0
    _check_chars(size, "join()")
    return method(items)


def _call_replace(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:
    if len(args) >= 2:
        _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    return method(*args, **kwargs)


def _call_translate(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:
    if args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
        _check_chars(len(owner) * max(longest, 1), "translate()")
    return method(*args, **kwargs)


def _call_split(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:  # split rsplit
    if len(owner) <= MAX_ITEMS or len(args) > 2 or not set(kwargs) <= {"sep", "maxsplit"}:
        return method(*args, **kwargs)
    sep = args[0] if args else kwargs.get("sep")
    maxsplit = args[1] if len(args) > 1 else kwargs.get("maxsplit", -1)
    if not isinstance(maxsplit, int) or 0 <= maxsplit < MAX_ITEMS:
        return method(*args, **kwargs)
    parts = method(sep, MAX_ITEMS)
    _check_items(len(parts), f"{method.__name__}()")
    return parts


def _call_splitlines(method: Any, owner: Any, args: tuple, kwargs: dict) -> Any:
    if len(owner) > MAX_ITEMS:
        if isinstance(owner, str):
            lines = sum(owner.count(c) for c in _LINE_BREAKS) - owner.count("\r\n")
        else:
            lines = owner.count(b"\n") + owner.count(b"\r") - owner.count(b"\r\n")
        _check_items(lines + 1, "splitlines()")
    return method(*args, **kwargs)


_TEXT_METHODS: dict[str, Callable[[Any, Any, tuple, dict], Any]] = {
    "center": _call_pad, "ljust": _call_pad, "rjust": _call_pad, "zfill": _call_pad,
    "expandtabs": _call_expandtabs, "join": _call_join, "replace": _call_replace,
    "translate": _call_translate, "split": _call_split, "rsplit": _call_split,
    "splitlines": _call_splitlines,
}


# --- globals and filters ------------------------------------------------------------------

def _raise_exception(message: Any) -> None:
    if not isinstance(message, str):
        _text_size(message)
        message = str(message)
    if len(message) > 2000:
        message = message[:2000] + "…"
    raise TemplateError(f"the chat template refused the messages: {message}")


def _strftime_now(format: str) -> str:
    if isinstance(format, str):
        _check_chars(12 * len(format), "strftime_now()")  # '%c' writes 24 characters for 2
    return datetime.datetime.now().strftime(format)


def _range(*args: Any) -> range:
    result = range(*args)
    try:
        size = len(result)
    except OverflowError:
        size = MAX_ITEMS + 1
    _check_items(size, "range()")
    return result


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    from jinja2.utils import generate_lorem_ipsum

    if isinstance(n, int) and isinstance(max, int):
        _check_items(n * max, "lipsum() words")
    return generate_lorem_ipsum(n, html, min, max)


def _tojson(value: Any, indent: int | str | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False) -> str:
    _text_size(value, _JSON_ASCII if ensure_ascii else _JSON)
    if indent is None:
        return json.dumps(value, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    if width > MAX_JSON_INDENT:
        raise _over(f"tojson(indent={width}) is wider than {MAX_JSON_INDENT}", "MAX_JSON_INDENT")
    # json.dumps(..., indent=...) is this same Python-level encoder, joined at once; here each
    # chunk is counted, since indentation grows with the depth of the value.
    encoder = json.JSONEncoder(indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    parts, size, budget = [], 0, _BUDGET.get()
    for chunk in encoder.iterencode(value):
        size += len(chunk)
        _check_chars(size, "tojson")
        parts.append(chunk)
        if budget is not None and not len(parts) & 4095:
            budget.tick()
    return "".join(parts)


def _list(value: Any) -> list:
    return list(value)  # the limited wrapper has materialized and counted it


def _sum(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    from jinja2.filters import make_attrgetter

    items = _materialize(iterable, "sum")
    if attribute is not None:
        getter = make_attrgetter(environment, attribute)
        items = [getter(item) for item in items]
    kind = list if isinstance(start, list) else tuple if isinstance(start, tuple) else None
    if kind is not None and all(isinstance(item, kind) for item in items):
        # sum() of lists copies the growing result at each step (quadratic); chain them instead
        _check_items(len(start) + sum(len(item) for item in items), "sum()")
        return kind(itertools.chain(start, *items))
    return sum(items, start)


def _guard_center(value: Any, width: Any = 80) -> None:
    _check_width(width, "center")


def _guard_indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> None:
    text = s if isinstance(s, str) else ""
    lines = text.count("\n") + 1
    _check_items(lines, "indent (lines)")
    indent = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    _check_chars(len(text) + lines * max(indent, 0), "indent")


def _guard_replace(s: Any, old: Any, new: Any, count: Any = None) -> None:
    text, old, new = (v if isinstance(v, str) else str(v) for v in (s, old, new))
    _check_replace(text, old, new, -1 if count is None else count)


def _guard_format(value: Any, *args: Any, **kwargs: Any) -> None:
    _check_percent(value if isinstance(value, str) else str(value), kwargs or args)


def _guard_wordwrap(s: Any, width: Any = 79, break_long_words: bool = True, wrapstring: Any = None,
                    break_on_hyphens: bool = True) -> None:
    text = s if isinstance(s, str) else ""
    if isinstance(width, int) and width > 0 and isinstance(wrapstring, str):
        lines = len(text) // width + text.count("\n") + 1
        _check_chars(len(text) + lines * len(wrapstring), "wordwrap")


def _guard_batch(value: Any, linecount: Any, fill_with: Any = None) -> None:
    if isinstance(linecount, int):
        _check_items(linecount, "batch")


def _guard_slice(value: Any, slices: Any, fill_with: Any = None) -> None:
    if isinstance(slices, int):
        _check_items(slices, "slice")


def _guard_join(value: Any, d: Any = "", attribute: Any = None) -> None:
    if isinstance(value, str):
        _check_chars(len(value) * (1 + _text_size(d)), "join")
        return
    size = _text_size(d) * max(len(value) - 1, 0)
    for item in value:
        size += _text_size(item)  # with attribute=, the whole item: an upper bound
        _check_chars(size, "join")


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


def _limited_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    offset = 1 if hasattr(func, "jinja_pass_arg") else 0  # context, eval context or environment first
    guard = _FILTER_GUARDS.get(name)
    textual = name in _TEXT_FILTERS
    itemwise = name in _ITEM_FILTERS
    slow = SLOW_FILTER_INPUT.get(name)
    counted = name not in _SELECTING_FILTERS

    def limited(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None and _monotonic() > budget.deadline:
            budget.tick()
        if len(args) > offset:
            value = args[offset]
            if itemwise:
                if not isinstance(value, str):
                    args = (*args[:offset], _materialize(value, f"the {name} filter"), *args[offset + 1:])
                elif name not in ("join", "reverse"):
                    _check_items(len(value), f"the {name} filter")
            if textual:
                _check_text_args(args[offset:], kwargs)
            if slow is not None:
                size = len(value) if isinstance(value, str) else _text_size(value)
                if size > slow:
                    raise _over(f"the {name} filter on more than {slow:,} characters", "SLOW_FILTER_INPUT")
            if guard is not None:
                guard(*args[offset:], **kwargs)
        result = func(*args, **kwargs)
        if (budget is not None and counted and isinstance(result, _BUILT)
                and (len(args) <= offset or result is not args[offset])):
            budget.build(len(result))
        return result

    return functools.update_wrapper(limited, func)  # keeps jinja's pass_context & co. markers


class _CountedIterable:
    """A for loop's iterable: each item counts against the budget (length passes through)."""

    __slots__ = ("_iterable",)

    def __init__(self, iterable: Any) -> None:
        self._iterable = iterable

    def __len__(self) -> int:
        return len(self._iterable)

    def __iter__(self) -> Any:
        budget = _BUDGET.get()
        if budget is None:
            yield from self._iterable
            return
        for item in self._iterable:
            budget.iterations += 1
            if budget.iterations > budget.max_iterations or _monotonic() > budget.deadline:
                budget.check_iterations()
            yield item


def _finalize(value: Any) -> Any:
    """Every ``{{ ... }}`` output: printing a list prints its items; size it first."""
    if type(value) not in _PLAIN_TYPES:
        size = _text_size(value)
        budget = _BUDGET.get()
        if budget is not None:
            budget.build(size)
    return value


_LOOP_FILTER = "mullama_counted_loop"
_CONCAT_FILTER = "mullama_limited_concat"
_SLICE_FILTER = "mullama_counted_slice"


@functools.lru_cache(maxsize=1)
def _environment_class() -> type:
    """The sandbox with limits (built on first use: jinja2 is imported lazily)."""
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.runtime import markup_join, str_join
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
    from jinja2.utils import Namespace, pass_environment, pass_eval_context
    from jinja2.visitor import NodeTransformer
    from markupsafe import Markup

    global _CONTAINERS
    if Namespace not in _CONTAINERS:
        _CONTAINERS = (*_CONTAINERS, Namespace)

    class LimitedFormatter(_FormatLimits, SandboxedFormatter):
        pass

    class LimitedEscapeFormatter(_FormatLimits, SandboxedEscapeFormatter):
        _factor = 6

    def concat_values(eval_ctx: Any, values: list) -> str:
        """``a ~ b ~ c``, sized before it is joined."""
        size = 0
        for value in values:
            size += len(value) if type(value) is str else _text_size(value)
        _check_chars(size * (6 if eval_ctx.autoescape else 1), "'~' concatenation")
        result = markup_join(values) if eval_ctx.autoescape else str_join(values)
        _built(result)
        return result

    def counted_slice(value: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            if _monotonic() > budget.deadline:
                budget.tick()
            if isinstance(value, _SEQUENCES):
                budget.build(len(value))
        return value

    def counted_loop(iterable: Any) -> _CountedIterable:
        return _CountedIterable(iterable)

    def wrap(node: Any, name: str) -> Any:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    class Instrument(NodeTransformer):
        """Counts every for loop's items and every slice's copy; sizes every ``~`` concatenation."""

        def visit_For(self, node: Any) -> Any:
            self.generic_visit(node)
            node.iter = wrap(node.iter, _LOOP_FILTER)
            if node.recursive:  # loop(children) starts the loop body again on more items
                for call in node.find_all(nodes.Call):
                    if (isinstance(call.node, nodes.Name) and call.node.name == "loop" and call.args
                            and not (isinstance(call.args[0], nodes.Filter) and call.args[0].name == _LOOP_FILTER)):
                        call.args[0] = wrap(call.args[0], _LOOP_FILTER)
            return node

        def visit_Getitem(self, node: Any) -> Any:
            self.generic_visit(node)
            if isinstance(node.arg, nodes.Slice):  # compiled to plain obj[a:b], past the sandbox's getitem
                return wrap(node, _SLICE_FILTER)
            return node

        def visit_Concat(self, node: Any) -> Any:
            self.generic_visit(node)
            return wrap(nodes.List(node.nodes, lineno=node.lineno), _CONCAT_FILTER)

    class GenerationBlocks(Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask markers):
        rendered as their body, as llama.cpp does."""

        tags = {"generation"}  # noqa: RUF012 (jinja's Extension API)

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "*", "**", "%"})

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=_finalize,
                             extensions=["jinja2.ext.loopcontrols", GenerationBlocks])
            self.filters["tojson"] = _tojson
            self.filters["sum"] = pass_environment(_sum)
            self.filters["list"] = _list
            for name, func in list(self.filters.items()):
                self.filters[name] = _limited_filter(name, func)
            self.filters[_LOOP_FILTER] = counted_loop
            self.filters[_SLICE_FILTER] = counted_slice
            self.filters[_CONCAT_FILTER] = pass_eval_context(concat_values)
            self.globals.update(range=_range, lipsum=_lipsum, raise_exception=_raise_exception,
                                strftime_now=_strftime_now)

        def compile_limited(self, source: str) -> Any:
            tree = Instrument().visit(self.parse(source))
            tree.set_environment(self)
            return self.from_string(tree)

        def concat(self, parts: Any) -> str:  # type: ignore[override]
            """Joins the output of macros, ``{% set %}`` and ``{% filter %}`` blocks."""
            if not isinstance(parts, list):
                parts = list(parts)
            _check_chars(sum(map(len, parts)), "a block's output")
            result = "".join(parts)
            _built(result)
            return result

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            # (no clock check: without loops and calls, which check it, operators cannot go on long)
            if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept short
                size = len(left) + len(right)
                if size > MAX_OUTPUT_CHARS:
                    _check_chars(size, "'+' concatenation")
                budget = _BUDGET.get()
                if budget is not None:
                    budget.built += size
                    if budget.built > budget.next_check:
                        budget.check_memory()
                return left + right
            if operator == "+":
                _check_add(left, right)
            elif operator == "*":
                _check_multiply(left, right)
            elif operator == "**":
                _check_power(left, right)
            elif isinstance(left, (str, bytes)):
                _check_percent(left, right, 6 if isinstance(left, Markup) else 1)
            result = self.binop_table[operator](left, right)
            if isinstance(result, _SEQUENCES):
                _built(result)
            return result

        def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            budget = _BUDGET.get()
            if budget is not None and _monotonic() > budget.deadline:
                budget.tick()
            owner = obj.__self__ if type(obj) in _METHOD_TYPES else None  # Markup's methods are Python's
            if isinstance(owner, (str, bytes)):
                kwargs.pop("_loop_vars", None)  # jinja's own, for functions that take the context
                kwargs.pop("_block_vars", None)
                if obj.__name__ in ("format", "format_map") and isinstance(owner, str):
                    result = self.wrap_str_format(obj)(*args, **kwargs)  # type: ignore[misc]
                else:
                    guard = _TEXT_METHODS.get(obj.__name__)
                    if guard is not None:
                        result = guard(obj, owner, args, kwargs)
                    else:
                        result = super().call(context, obj, *args, **kwargs)
            else:
                if isinstance(owner, int) and obj.__name__ == "to_bytes":
                    _check_width(args[0] if args else kwargs.get("length", 1), "int.to_bytes()")
                result = super().call(context, obj, *args, **kwargs)
            if budget is not None and isinstance(result, _BUILT) and result is not owner:
                # (also what a call merely returns, like dict.get(): only a reason to measure sooner)
                budget.build(len(result))
            return result

        def getattr(self, obj: Any, attribute: str) -> Any:
            # Fast paths for what templates read most, with jinja2's answers: a plain dict's key
            # that is no dict attribute (message.role), and a namespace's value (ns.found; jinja2's
            # general path costs ~12 us there, which made Gemma 4's template, which compares every
            # message with every earlier one, take 15 s for 1,400 messages).
            if type(obj) is dict:
                if attribute not in _DICT_ATTRIBUTES:
                    try:
                        return obj[attribute]
                    except KeyError:
                        pass
            elif type(obj) is Namespace and not attribute.startswith("_"):
                attrs = _namespace_attrs(obj)
                value = _MISSING if attrs is None else attrs.get(attribute, _MISSING)
                if value is not _MISSING and not isinstance(value, _METHOD_TYPES):
                    return value
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            # jinja2's fast path (subscription is always allowed; the fallback to attributes is
            # checked by super()); also serves the attribute lookups of groupby, sort, map,
            # selectattr... (make_attrgetter), so it checks the clock.
            budget = _BUDGET.get()
            if budget is not None and _monotonic() > budget.deadline:
                budget.tick()
            try:
                return obj[argument]
            except (TypeError, LookupError):
                return super().getitem(obj, argument)

        def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
            """jinja2's own (3.1.6), with formatters that count what they write."""
            if (not isinstance(value, (types.MethodType, types.BuiltinMethodType))
                    or value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str)):
                return None
            f_self = value.__self__
            str_type = type(f_self)
            is_format_map = value.__name__ == "format_map"

            def wrapper(*args: Any, **kwargs: Any) -> str:
                formatter: Any
                if isinstance(f_self, Markup):
                    formatter = LimitedEscapeFormatter(self, escape=f_self.escape)
                else:
                    formatter = LimitedFormatter(self)
                if is_format_map:
                    if kwargs:
                        raise TypeError("format_map() takes no keyword arguments")
                    if len(args) != 1:
                        raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                    kwargs = args[0]
                    args = ()
                return str_type(formatter.vformat(f_self, args, kwargs))

            return functools.update_wrapper(wrapper, value)

    return LimitedEnvironment


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    import jinja2

    if len(source) > MAX_TEMPLATE_CHARS:
        raise _over(f"a template of more than {MAX_TEMPLATE_CHARS:,} characters", "MAX_TEMPLATE_CHARS")
    env = _environment_class()()
    try:
        return env.compile_limited(source)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the model's chat template does not parse: {_clip(exc)}") from None
    except RecursionError:
        raise _over(f"a template nested deeper than Python's recursion limit ({sys.getrecursionlimit()})",
                    "sys.getrecursionlimit()") from None
    except MemoryError:
        raise TemplateError("the model's chat template is too big to compile; it is broken or hostile.") from None


def render(source: str, variables: dict[str, Any], n_messages: int) -> str:
    """Render the template ``source`` with ``variables`` within the limits above (which grow with
    ``n_messages``); every failure is a TemplateError."""
    from jinja2.exceptions import SecurityError

    template = _compile(source)
    budget = _Budget(n_messages)
    token = _BUDGET.set(budget)
    try:
        parts, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise _over(f"a prompt of more than {MAX_OUTPUT_CHARS:,} characters", "MAX_OUTPUT_CHARS")
            if _monotonic() > budget.deadline:
                budget.tick()
            parts.append(chunk)
        return "".join(parts)
    except TemplateError:
        raise
    except RecursionError:
        raise _over(f"calls nested deeper than Python's recursion limit ({sys.getrecursionlimit()})",
                    "sys.getrecursionlimit()") from None
    except MemoryError:
        raise TemplateError("the chat template ran out of memory; the model file's template is broken "
                            "or hostile.") from None
    except SecurityError as exc:
        raise TemplateError(f"the chat template tried something unsafe and was stopped: {_clip(exc)}") from None
    except Exception as exc:  # noqa: BLE001 (a template is untrusted code: every failure is reported alike)
        raise TemplateError(f"the chat template failed: {type(exc).__name__}: {_clip(exc)}") from None
    finally:
        _BUDGET.reset(token)


def _clip(exc: BaseException, limit: int = 2000) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "…"
