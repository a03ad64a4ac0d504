"""The operators ``+ * ** %`` and ``str.format()`` in chat templates, sized before they run.

The sandbox's ``call_binop`` hook and its formatters call these, so that ``[0] * 10**8``,
``10 ** (10**8)`` or ``'%999999999s' % x`` compute the result's size from their operands and
refuse, instead of building it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from typing import Any

from ._sandbox_limits import BUDGET, MAX_INT_BITS, MAX_OUTPUT_CHARS, SEQUENCES, check_chars, check_items, over
from ._sandbox_sizes import ASCII, REPR, STR, text_size

__all__ = ["FormatLimits", "check_add", "check_multiply", "check_percent", "check_power"]


def _sequence_limit(seq: Any, size: int, what: str) -> None:
    if isinstance(seq, (str, bytes)):
        check_chars(size, what)
    else:
        check_items(size, what)


def _check_int_bits(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise over(f"{what} would make an integer of more than {MAX_INT_BITS:,} bits", "MAX_INT_BITS")


def check_multiply(left: Any, right: Any) -> None:
    if isinstance(right, int) and isinstance(left, SEQUENCES):
        _sequence_limit(left, len(left) * right, "'*' repetition")
    elif isinstance(left, int) and isinstance(right, SEQUENCES):
        _sequence_limit(right, len(right) * left, "'*' repetition")
    elif isinstance(left, int) and isinstance(right, int):
        _check_int_bits(left.bit_length() + right.bit_length(), "'*'")


def check_add(left: Any, right: Any) -> None:
    if isinstance(left, SEQUENCES) and isinstance(right, SEQUENCES):
        _sequence_limit(left, len(left) + len(right), "'+' concatenation")


def check_power(left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        _check_int_bits(abs(left).bit_length() * right, "'**'")


_PERCENT_SPEC = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.DOTALL)


def check_percent(fmt: str | bytes, values: Any, factor: int = 1) -> None:
    """Refuse ``fmt % values`` if its result could pass MAX_OUTPUT_CHARS (widths included)."""
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    if "%" not in text:
        return
    mapping = values if isinstance(values, Mapping) else None
    positional = list(values) if isinstance(values, tuple) else [values]
    size, index, budget = len(text), 0, BUDGET.get()
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
        mode = REPR if conversion == "r" else ASCII if conversion == "a" else STR
        size += text_size(value, mode) * factor
        if isinstance(value, float) and conversion in "dieEfFgG":
            size += 330  # '%f' % 1e308 prints all 309 digits
        check_chars(size, "'%' formatting")
        if budget is not None and not count & 1023:
            budget.tick()


# --- str.format ---------------------------------------------------------------------------

_FORMAT_NUMBERS = re.compile(r"\d+")


class FormatLimits(string.Formatter):
    """Counts what str.format() writes, field by field, before writing it."""

    _chars = 0
    _factor = 1  # the escaping formatter (Markup.format) may write 6 characters for one

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion in ("r", "a"):
            text_size(value, REPR if conversion == "r" else ASCII)
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        size = text_size(value)
        for number in _FORMAT_NUMBERS.findall(format_spec):
            size += int(number) if len(number) <= 9 else MAX_OUTPUT_CHARS + 1
        self._chars += size * self._factor
        check_chars(self._chars, "str.format()")
        return super().format_field(value, format_spec)


