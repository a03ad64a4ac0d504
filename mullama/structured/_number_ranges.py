"""Digit-range GBNF for bounded integers and numbers: a value's text is within its bounds digit by digit.

GBNF has no arithmetic, so ``minimum`` / ``maximum`` (and their exclusive forms) become alternatives
over the digits of the number's text. For integers this is upstream's build_min_max_int, ported (with
one fix where upstream drops the leading zeros of a tail, see :func:`_min_max_int`). Bounds on
``number`` are not in upstream, which ignores them: a bounded number is written without an exponent
and its fraction compared with the bound's, one digit position at a time.
"""

from __future__ import annotations

from decimal import Decimal

from ._schema_tree import _Number


def _min_max_int(min_value: int | None, max_value: int | None, out: list[str], decimals_left: int = 16,
                 top_level: bool = True) -> None:
    """Digit-range rules for the integers in [min_value, max_value] (None: unbounded), as upstream."""

    def digit_range(lo: str, hi: str) -> None:
        out.append(f"[{lo}]" if lo == hi else f"[{lo}-{hi}]")

    def more_digits(min_digits: int, max_digits: int | None) -> None:
        out.append("[0-9]")
        if min_digits == max_digits == 1:
            return
        out.append("{" + str(min_digits))
        if max_digits != min_digits:
            out.append("," + ("" if max_digits is None else str(max_digits)))
        out.append("}")

    def uniform_range(lo: str, hi: str) -> None:
        i = 0
        while i < len(lo) and i < len(hi) and lo[i] == hi[i]:
            i += 1
        if i > 0:
            out.append(f'"{lo[:i]}"')
        if i < len(lo) and i < len(hi):
            if i > 0:
                out.append(" ")
            sub_len = len(lo) - i - 1
            if sub_len > 0:
                lo_sub, hi_sub = lo[i + 1:], hi[i + 1:]
                zeros, nines = "0" * sub_len, "9" * sub_len
                to_reached = False
                out.append("(")
                if lo_sub == zeros:
                    digit_range(lo[i], chr(ord(hi[i]) - 1))
                    out.append(" ")
                    more_digits(sub_len, sub_len)
                else:
                    out.append(f"[{lo[i]}] (")
                    uniform_range(lo_sub, nines)
                    out.append(")")
                    if ord(lo[i]) < ord(hi[i]) - 1:
                        out.append(" | ")
                        if hi_sub == nines:
                            digit_range(chr(ord(lo[i]) + 1), hi[i])
                            to_reached = True
                        else:
                            digit_range(chr(ord(lo[i]) + 1), chr(ord(hi[i]) - 1))
                        out.append(" ")
                        more_digits(sub_len, sub_len)
                if not to_reached:
                    out.append(" | ")
                    digit_range(hi[i], hi[i])
                    out.append(" ")
                    uniform_range(zeros, hi_sub)
                out.append(")")
            else:
                out.append(f"[{lo[i]}-{hi[i]}]")

    if min_value is not None and max_value is not None:
        if min_value < 0 and max_value < 0:
            out.append('"-" (')
            _min_max_int(-max_value, -min_value, out, decimals_left, True)
            out.append(")")
            return
        if min_value < 0:
            out.append('"-" (')
            _min_max_int(0, -min_value, out, decimals_left, True)
            out.append(") | ")
            min_value = 0
        min_s, max_s = str(min_value), str(max_value)
        for digits in range(len(min_s), len(max_s)):
            uniform_range(min_s, "9" * digits)
            min_s = "1" + "0" * digits
            out.append(" | ")
        uniform_range(min_s, max_s)
        return

    less_decimals = max(decimals_left - 1, 1)
    if min_value is not None:
        if min_value < 0:
            out.append('"-" (')
            _min_max_int(None, -min_value, out, decimals_left, False)
            out.append(") | [0] | [1-9] ")
            more_digits(0, decimals_left - 1)
        elif min_value == 0:
            if top_level:
                out.append("[0] | [1-9] ")
                more_digits(0, less_decimals)
            else:
                more_digits(1, decimals_left)
        elif min_value <= 9:
            c = str(min_value)
            range_start = "1" if top_level else "0"
            if c > range_start:
                digit_range(range_start, chr(ord(c) - 1))
                out.append(" ")
                more_digits(1, less_decimals)
                out.append(" | ")
            digit_range(c, "9")
            out.append(" ")
            more_digits(0, less_decimals)
        else:
            min_s = str(min_value)
            c = min_s[0]
            if c > "1":
                digit_range("1" if top_level else "0", chr(ord(c) - 1))
                out.append(" ")
                more_digits(len(min_s), less_decimals)
                out.append(" | ")
            digit_range(c, c)
            out.append(" (")
            tail = min_s[1:]
            if len(tail) > 1 and tail[0] == "0":
                # Not upstream: it recurses on stoll("01") == 1, which drops the tail's length, so
                # that its minimum 101 accepts 100 and 11..19. The digits after c are at least `tail`.
                out.append(_at_least(tail, less_decimals))
            else:
                _min_max_int(int(tail), None, out, less_decimals, False)
            out.append(")")
            if c < "9":
                out.append(" | ")
                digit_range(chr(ord(c) + 1), "9")
                out.append(" ")
                more_digits(len(min_s) - 1, less_decimals)
        return

    if max_value is not None:
        if max_value >= 0:
            if top_level:
                out.append('"-" [1-9] ')
                more_digits(0, less_decimals)
                out.append(" | ")
            _min_max_int(0, max_value, out, decimals_left, True)
        else:
            out.append('"-" (')
            _min_max_int(-max_value, None, out, decimals_left, False)
            out.append(")")
        return

    raise ValueError("At least one of min_value or max_value must be set")


def _at_least(tail: str, max_digits: int) -> str:
    """Digit strings (leading zeros allowed) of len(tail)..max_digits digits, at least ``tail``."""

    def same_length(digits: str) -> str:
        first, rest = digits[0], digits[1:]
        if not rest:
            return f"[{first}]" if first == "9" else f"[{first}-9]"
        alternatives = []
        if first < "9":
            higher = chr(ord(first) + 1)
            span = f"[{higher}]" if higher == "9" else f"[{higher}-9]"
            alternatives.append(f"{span} " + ("[0-9]" if len(rest) == 1 else f"[0-9]{{{len(rest)}}}"))
        alternatives.append(f"[{first}] ({same_length(rest)})")
        return " | ".join(alternatives)

    longer = f"[0-9]{{{len(tail) + 1},{max_digits}}} | " if max_digits > len(tail) else ""
    return longer + same_length(tail)


# --- number bounds (not in upstream, which ignores them) ---------------------------------------
# A bounded number is written without an exponent: "-"? integer ("." digits)?, the integer part
# as upstream's integral-part. The fraction's digits are compared with the bound's digits, one
# position at a time: a digit strictly between the bounds' digits frees the rest.

_FREE_DIGITS = "[0-9]{1,16}"
_Side = tuple[str, bool] | None  # (fraction digits without trailing zeros, exclusive) or free


def _fraction(lower: _Side, upper: _Side) -> tuple[list[str], bool]:
    """Alternatives for a non-empty fraction F with lower < 0.F < upper (or <=), and whether the
    empty fraction (0.000...) is also within the bounds."""
    if lower is not None and lower[0] == "" and not lower[1]:
        lower = None  # >= 0: always true
    if lower is None and upper is None:
        return [_FREE_DIGITS], True
    if upper is None:
        assert lower is not None
        if lower[0] == "":  # > 0: some digit is not 0
            return ['"0"{0,15} [1-9] [0-9]{0,15}'], False
    elif upper[0] == "":
        if upper[1] or lower is not None:  # < 0, or > 0 and <= 0: nothing
            return [], False
        return ['"0"{1,16}'], True  # <= 0: only zeros
    empty_ok = lower is None and upper is not None and upper[0] != ""
    lo_digit = lower[0][0] if lower is not None and lower[0] else "0"
    hi_digit = upper[0][0] if upper is not None else "9"
    alternatives: list[str] = []
    free_lo = chr(ord(lo_digit) + 1) if lower is not None else lo_digit
    free_hi = chr(ord(hi_digit) - 1) if upper is not None else hi_digit
    specials = sorted({d for d, bounded in ((lo_digit, lower is not None), (hi_digit, upper is not None))
                       if bounded})
    for digit in specials:
        next_lower: _Side = None
        next_upper: _Side = None
        if lower is not None and digit == lo_digit:
            next_lower = (lower[0][1:], lower[1])
        if upper is not None and digit == hi_digit:
            next_upper = (upper[0][1:], upper[1])
        rest, rest_empty = _fraction(next_lower, next_upper)
        if rest:
            body = rest[0] if len(rest) == 1 else "(" + " | ".join(rest) + ")"
            alternatives.append(f'"{digit}" ' + (f"({body})?" if rest_empty else body))
        elif rest_empty:
            alternatives.append(f'"{digit}"')
    if free_lo <= free_hi:
        rng = f"[{free_lo}]" if free_lo == free_hi else f"[{free_lo}-{free_hi}]"
        alternatives.insert(0, f"{rng} [0-9]{{0,15}}")
    return alternatives, empty_ok


def _split(value: Decimal) -> tuple[int, str]:
    text = format(value, "f")
    whole, _, fraction = text.partition(".")
    return int(whole), fraction.rstrip("0")


def _with_fraction(integer: str, lower: _Side, upper: _Side) -> str | None:
    alternatives, empty_ok = _fraction(lower, upper)
    if not alternatives:
        return integer if empty_ok else None
    body = alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"
    return f'{integer} ("." {body})' + ("?" if empty_ok else "")


def _magnitude(lower: tuple[Decimal, bool], upper: tuple[Decimal, bool] | None) -> list[str]:
    """Alternatives for the non-negative numbers x with lower < x < upper (or <=), lower >= 0."""
    low_int, low_fraction = _split(lower[0])
    low_side: _Side = (low_fraction, lower[1])
    alternatives: list[str | None] = []
    if upper is None:
        alternatives.append(_with_fraction(f'"{low_int}"', low_side, None))
        out: list[str] = []
        _min_max_int(low_int + 1, None, out)
        alternatives.append(f'({"".join(out)}) ("." {_FREE_DIGITS})?')
    else:
        high_int, high_fraction = _split(upper[0])
        high_side: _Side = (high_fraction, upper[1])
        if low_int == high_int:
            alternatives.append(_with_fraction(f'"{low_int}"', low_side, high_side))
        else:
            alternatives.append(_with_fraction(f'"{low_int}"', low_side, None))
            if low_int + 1 <= high_int - 1:
                out = []
                _min_max_int(low_int + 1, high_int - 1, out)
                alternatives.append(f'({"".join(out)}) ("." {_FREE_DIGITS})?')
            alternatives.append(_with_fraction(f'"{high_int}"', None, high_side))
    return [alternative for alternative in alternatives if alternative is not None]


def _number_rule(node: _Number) -> str:
    zero = Decimal(0)
    lower, upper = node.lower, node.upper
    alternatives: list[str] = []
    if lower is not None and lower[0] >= zero:
        alternatives += _magnitude(lower, upper)
    elif upper is not None and upper[0] <= zero:
        negative = _magnitude((-upper[0], upper[1]), None if lower is None else (-lower[0], lower[1]))
        alternatives.append('"-" (' + " | ".join(negative) + ")")
        if upper[0] == zero and not upper[1]:
            alternatives += _magnitude((zero, False), (zero, False))  # 0 itself
    else:
        negative = _magnitude((zero, False), None if lower is None else (-lower[0], lower[1]))
        alternatives.append('"-" (' + " | ".join(negative) + ")")
        alternatives += _magnitude((zero, False), upper)
    return "(" + " | ".join(alternatives) + ")"
