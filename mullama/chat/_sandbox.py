"""The sandbox chat templates render in: jinja2's, with resource limits (model files may be hostile).

Templates come from model files, which may be hostile. They run in jinja2's
ImmutableSandboxedEnvironment, which refuses access to Python internals and mutation of
the inputs, extended here with resource limits (see ``_sandbox_limits``): a template that
loops forever, builds a gigabyte string or list, or formats with a huge width is stopped
before it does, with a TemplateError that names the limit. Any other failure is a
TemplateError too. The environment mirrors what llama.cpp (and Hugging Face
transformers) give templates: ``trim_blocks`` and ``lstrip_blocks``, loop controls,
``{% generation %}`` blocks (rendered as their body), ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII text, and the variables
``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt`` and
``enable_thinking``.

Sizes are checked *before* the work: ``[0] * 10**8``, ``'x'.ljust(10**9)``,
``'%999999999s' % x``, ``10 ** (10**8)`` or ``','.join(huge)`` compute the result's size
from their operands and refuse; printing a value (``{{ x }}``, ``~``, ``%``, ``format``,
filters) sizes it from its parts first (``_sandbox_sizes``), so ``{{ [s] * 1000 }}`` with a
9 MB ``s`` is refused, not attempted. Every ``for`` loop, slice and ``~`` concatenation is
instrumented by rewriting the parsed template (public ``jinja2.nodes`` API; here); operators
``+ * ** %`` use the sandbox's ``intercepted_binops`` hook (``_sandbox_operators``); calls of the
string methods that can grow a string (``center``, ``ljust``, ``rjust``, ``zfill``,
``expandtabs``, ``join``, ``replace``, ``translate``, ``format``, ``split``...) are checked in the
sandbox's ``call`` hook (``_sandbox_methods``); filters are wrapped (``_sandbox_filters``).
``RecursionError`` and ``MemoryError`` become TemplateError as well.

The modules import one way: ``_sandbox_limits`` <- ``_sandbox_sizes`` <- ``_sandbox_operators``,
``_sandbox_methods`` <- ``_sandbox_filters`` <- this one.
"""

from __future__ import annotations

import functools
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from .._exceptions import TemplateError
from ._sandbox_filters import (
    limited_filter,
    limited_lipsum,
    limited_list,
    limited_range,
    limited_sum,
    raise_exception,
    strftime_now,
    tojson,
)
from ._sandbox_limits import (
    BUDGET,
    BUILT,
    MAX_OUTPUT_CHARS,
    MAX_TEMPLATE_CHARS,
    SEQUENCES,
    Budget,
    check_chars,
    check_width,
    count_built,
    over,
)
from ._sandbox_methods import TEXT_METHODS
from ._sandbox_operators import FormatLimits, check_add, check_multiply, check_percent, check_power
from ._sandbox_sizes import PLAIN_TYPES, add_container, namespace_attrs, text_size

__all__ = ["MAX_OUTPUT_CHARS", "render"]

_METHOD_TYPES = (types.BuiltinMethodType, types.MethodType)
_DICT_ATTRIBUTES = frozenset(dir(dict))
_MISSING = object()
_monotonic = time.monotonic


class _CountedIterable:
    """A for loop's iterable: each item counts against the budget (length passes through)."""

    __slots__ = ("_iterable",)

    def __init__(self, iterable: Any) -> None:
        self._iterable = iterable

    def __len__(self) -> int:
        return len(self._iterable)

    def __iter__(self) -> Any:
        budget = BUDGET.get()
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
    if type(value) not in PLAIN_TYPES:
        size = text_size(value)
        budget = BUDGET.get()
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

    add_container(Namespace)

    class LimitedFormatter(FormatLimits, SandboxedFormatter):
        pass

    class LimitedEscapeFormatter(FormatLimits, SandboxedEscapeFormatter):
        _factor = 6

    def concat_values(eval_ctx: Any, values: list) -> str:
        """``a ~ b ~ c``, sized before it is joined."""
        size = 0
        for value in values:
            size += len(value) if type(value) is str else text_size(value)
        check_chars(size * (6 if eval_ctx.autoescape else 1), "'~' concatenation")
        result = markup_join(values) if eval_ctx.autoescape else str_join(values)
        count_built(result)
        return result

    def counted_slice(value: Any) -> Any:
        budget = BUDGET.get()
        if budget is not None:
            if _monotonic() > budget.deadline:
                budget.tick()
            if isinstance(value, SEQUENCES):
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
            self.filters["tojson"] = tojson
            self.filters["sum"] = pass_environment(limited_sum)
            self.filters["list"] = limited_list
            for name, func in list(self.filters.items()):
                self.filters[name] = limited_filter(name, func)
            self.filters[_LOOP_FILTER] = counted_loop
            self.filters[_SLICE_FILTER] = counted_slice
            self.filters[_CONCAT_FILTER] = pass_eval_context(concat_values)
            self.globals.update(range=limited_range, lipsum=limited_lipsum, raise_exception=raise_exception,
                                strftime_now=strftime_now)

        def compile_limited(self, source: str) -> Any:
            tree = Instrument().visit(self.parse(source))
            tree.set_environment(self)
            return self.from_string(tree)

        def concat(self, parts: Any) -> str:  # type: ignore[override]
            """Joins the output of macros, ``{% set %}`` and ``{% filter %}`` blocks."""
            if not isinstance(parts, list):
                parts = list(parts)
            check_chars(sum(map(len, parts)), "a block's output")
            result = "".join(parts)
            count_built(result)
            return result

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            # (no clock check: without loops and calls, which check it, operators cannot go on long)
            if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept short
                size = len(left) + len(right)
                if size > MAX_OUTPUT_CHARS:
                    check_chars(size, "'+' concatenation")
                budget = BUDGET.get()
                if budget is not None:
                    budget.built += size
                    if budget.built > budget.next_check:
                        budget.check_memory()
                return left + right
            if operator == "+":
                check_add(left, right)
            elif operator == "*":
                check_multiply(left, right)
            elif operator == "**":
                check_power(left, right)
            elif isinstance(left, (str, bytes)):
                check_percent(left, right, 6 if isinstance(left, Markup) else 1)
            result = self.binop_table[operator](left, right)
            if isinstance(result, SEQUENCES):
                count_built(result)
            return result

        def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            budget = BUDGET.get()
            if budget is not None and _monotonic() > budget.deadline:
                budget.tick()
            owner = obj.__self__ if type(obj) in _METHOD_TYPES else None  # Markup's methods are Python's
            if isinstance(owner, (str, bytes)):
                kwargs.pop("_loop_vars", None)  # jinja's own, for functions that take the context
                kwargs.pop("_block_vars", None)
                if obj.__name__ in ("format", "format_map") and isinstance(owner, str):
                    result = self.wrap_str_format(obj)(*args, **kwargs)  # type: ignore[misc]
                else:
                    guard = TEXT_METHODS.get(obj.__name__)
                    if guard is not None:
                        result = guard(obj, owner, args, kwargs)
                    else:
                        result = super().call(context, obj, *args, **kwargs)
            else:
                if isinstance(owner, int) and obj.__name__ == "to_bytes":
                    check_width(args[0] if args else kwargs.get("length", 1), "int.to_bytes()")
                result = super().call(context, obj, *args, **kwargs)
            if budget is not None and isinstance(result, BUILT) and result is not owner:
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
                attrs = namespace_attrs(obj)
                value = _MISSING if attrs is None else attrs.get(attribute, _MISSING)
                if value is not _MISSING and not isinstance(value, _METHOD_TYPES):
                    return value
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            # jinja2's fast path (subscription is always allowed; the fallback to attributes is
            # checked by super()); also serves the attribute lookups of groupby, sort, map,
            # selectattr... (make_attrgetter), so it checks the clock.
            budget = BUDGET.get()
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
        raise over(f"a template of more than {MAX_TEMPLATE_CHARS:,} characters", "MAX_TEMPLATE_CHARS")
    env = _environment_class()()
    try:
        return env.compile_limited(source)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the model's chat template does not parse: {_clip(exc)}") from None
    except RecursionError:
        raise over(f"a template nested deeper than Python's recursion limit ({sys.getrecursionlimit()})",
                   "sys.getrecursionlimit()") from None
    except MemoryError:
        raise TemplateError("the model's chat template is too big to compile; it is broken or hostile.") from None


def render(source: str, variables: dict[str, Any], n_messages: int) -> str:
    """Render the template ``source`` with ``variables`` within the limits above (which grow with
    ``n_messages``); every failure is a TemplateError."""
    from jinja2.exceptions import SecurityError

    template = _compile(source)
    budget = Budget(n_messages)
    token = BUDGET.set(budget)
    try:
        parts, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise over(f"a prompt of more than {MAX_OUTPUT_CHARS:,} characters", "MAX_OUTPUT_CHARS")
            if _monotonic() > budget.deadline:
                budget.tick()
            parts.append(chunk)
        return "".join(parts)
    except TemplateError:
        raise
    except RecursionError:
        raise over(f"calls nested deeper than Python's recursion limit ({sys.getrecursionlimit()})",
                   "sys.getrecursionlimit()") from None
    except MemoryError:
        raise TemplateError("the chat template ran out of memory; the model file's template is broken "
                            "or hostile.") from None
    except SecurityError as exc:
        raise TemplateError(f"the chat template tried something unsafe and was stopped: {_clip(exc)}") from None
    except Exception as exc:  # noqa: BLE001 (a template is untrusted code: every failure is reported alike)
        raise TemplateError(f"the chat template failed: {type(exc).__name__}: {_clip(exc)}") from None
    finally:
        BUDGET.reset(token)


def _clip(exc: BaseException, limit: int = 2000) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "…"
