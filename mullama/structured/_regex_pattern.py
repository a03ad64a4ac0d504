"""A JSON Schema ``pattern`` (a regular expression) as a GBNF rule, as upstream translates it.

The subset of upstream's converter (``_visit_pattern``): anchored patterns (``^...$``) of literals,
``.``, ``[...]`` classes, groups, ``|``, ``*``, ``+``, ``?`` and ``{m,n}``, plus the shorthands ``\\d``
and ``\\w`` (upstream lets any string through for those). Anything else raises
:class:`_UnsupportedPattern`, and a malformed regex :class:`_InvalidPattern`; the converter turns
both into :class:`~mullama.InvalidConfigError` naming the schema's place, where upstream would
accept any string. Apart from the schema walk because it reads another language (regex syntax).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ._gbnf_rules import _repetition

_NON_LITERAL = frozenset("|.()[]{}*+?^$")
_ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS = frozenset("^$.[](){}|*+?")
MAX_PATTERN_DEPTH = 100
_SHORTHANDS = {"d": "0-9", "w": "a-zA-Z0-9_"}  # safe inside a JSON string as they are


class _UnsupportedPattern(Exception):
    pass


class _InvalidPattern(Exception):
    pass


def _gbnf_escape_length(pattern: str, pos: int) -> int:
    if pos + 1 >= len(pattern) or pattern[pos] != "\\":
        return 0
    kind = pattern[pos + 1]
    if kind in 'trn\\"[]-':
        return 2
    n_hex = {"x": 2, "u": 4, "U": 8}.get(kind)
    if n_hex is None or pos + 2 + n_hex > len(pattern):
        return 0
    if not all(c in "0123456789abcdefABCDEF" for c in pattern[pos + 2:pos + 2 + n_hex]):
        return 0
    return 2 + n_hex


def _stoi(text: str) -> int:
    """``std::stoi``: leading spaces, a sign, digits, anything after ignored; out of int range fails."""
    match = re.match(r"\s*([+-]?\d+)", text)
    if match is None:
        raise _UnsupportedPattern("invalid number in curly brackets")
    value = int(match.group(1))
    if not -(2**31) <= value < 2**31:
        raise _UnsupportedPattern("invalid number in curly brackets")
    return value


def pattern_to_rule(add_rule: Callable[[str, str], str], pattern: str, name: str) -> str:
    """The rule ``name`` for a JSON string matching ``pattern`` (upstream's _visit_pattern), its
    sub-rules added with ``add_rule`` (the converter's, which names them). _UnsupportedPattern for
    what the translation cannot enforce, _InvalidPattern for a pattern that is not a regex."""
    if len(pattern) < 2 or not pattern.startswith("^") or not pattern.endswith("$"):
        raise _UnsupportedPattern("not anchored with '^' and '$'")
    sub = pattern[1:-1]
    length = len(sub)
    sub_rule_ids: dict[str, str] = {}
    state = {"i": 0, "depth": 0}

    def to_rule(item: tuple[str, bool]) -> str:
        text, is_literal = item
        return f'"{text}"' if is_literal else text

    def transform() -> tuple[str, bool]:
        seq: list[tuple[str, bool]] = []

        def join_seq() -> tuple[str, bool]:
            joined: list[tuple[str, bool]] = []
            literal = ""
            for text, is_literal in seq:
                if is_literal:
                    literal += text
                else:
                    if literal:
                        joined.append((literal, True))
                        literal = ""
                    joined.append((text, False))
            if literal:
                joined.append((literal, True))
            return " ".join(to_rule(item) for item in joined), False

        while state["i"] < length:
            i = state["i"]
            c = sub[i]
            if c == ".":
                seq.append((add_rule("dot", "[^\\x0A\\x0D]"), False))
                state["i"] += 1
            elif c == "\\" and i + 1 < length and sub[i + 1] in _SHORTHANDS:
                seq.append(("[" + _SHORTHANDS[sub[i + 1]] + "]", False))  # not upstream: it accepts any string
                state["i"] += 2
            elif c == "(":
                state["i"] += 1
                if state["i"] < length and sub[state["i"]] == "?":
                    if state["i"] + 1 < length and sub[state["i"] + 1] == ":":
                        state["i"] += 2  # a non-capturing group is a group
                    else:
                        raise _UnsupportedPattern("unsupported group syntax")
                state["depth"] += 1
                if state["depth"] > MAX_PATTERN_DEPTH:
                    raise _UnsupportedPattern("pattern nesting too deep")
                seq.append(("(" + to_rule(transform()) + ")", False))
            elif c == ")":
                state["i"] += 1
                if state["depth"] == 0:
                    raise _InvalidPattern("unbalanced parentheses")
                state["depth"] -= 1
                return join_seq()
            elif c in "^$":
                raise _UnsupportedPattern("anchor inside the pattern")
            elif c == "[":
                square = c
                i += 1
                while i < length and sub[i] != "]":
                    if sub[i] == "\\" and i + 1 < length and sub[i + 1] in _SHORTHANDS:
                        square += _SHORTHANDS[sub[i + 1]]
                        i += 2
                    elif sub[i] == "\\":
                        escape = _gbnf_escape_length(sub, i)
                        if escape == 0:
                            raise _UnsupportedPattern(f"unsupported escape in character class: {sub[i:i + 2]}")
                        square += sub[i:i + escape]
                        i += escape
                    else:
                        square += sub[i]
                        i += 1
                if i >= length:
                    raise _InvalidPattern("unterminated character class")
                state["i"] = i + 1
                seq.append((square + "]", False))
            elif c == "|":
                seq.append(("|", False))
                state["i"] += 1
            elif c in "*+?":
                if not seq:
                    raise _InvalidPattern("nothing to repeat")
                seq[-1] = (to_rule(seq[-1]) + c, False)
                state["i"] += 1
            elif c == "{":
                curly = c
                i += 1
                while i < length and sub[i] != "}":
                    curly += sub[i]
                    i += 1
                if i >= length:
                    raise _UnsupportedPattern("unterminated curly brackets")
                state["i"] = i + 1
                nums = curly[1:].split(",")
                if len(nums) not in (1, 2):
                    raise _UnsupportedPattern("wrong number of values in curly brackets")
                min_times, max_times = 0, None
                if len(nums) == 1:
                    min_times = max_times = _stoi(nums[0])
                else:
                    if nums[0]:
                        min_times = _stoi(nums[0])
                    if nums[1]:
                        max_times = _stoi(nums[1])
                if not seq:
                    raise _InvalidPattern("nothing to repeat")
                text, is_literal = seq[-1]
                if not is_literal:
                    if text not in sub_rule_ids:
                        sub_rule_ids[text] = ""
                        sub_rule_ids[text] = add_rule(f"{name}-{len(sub_rule_ids)}", text)
                    text = sub_rule_ids[text]
                seq[-1] = (_repetition(f'"{text}"' if is_literal else text, min_times, max_times), False)
            else:
                literal = ""
                while i < length:
                    if sub[i] == "\\" and i + 1 < length and sub[i + 1] in _SHORTHANDS:
                        break
                    if sub[i] == "\\":
                        if i == length - 1:
                            raise _InvalidPattern("trailing backslash")
                        following = sub[i + 1]
                        if following in _ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS:
                            literal += following
                            i += 2
                        else:
                            escape = _gbnf_escape_length(sub, i)
                            if escape == 0:
                                raise _UnsupportedPattern(f"unsupported escape: {sub[i:i + 2]}")
                            literal += sub[i:i + escape]
                            i += escape
                    elif sub[i] == '"':
                        literal += '\\"'
                        i += 1
                    elif sub[i] not in _NON_LITERAL and (
                            i == length - 1 or not literal or sub[i + 1] == "."
                            or sub[i + 1] not in _NON_LITERAL):
                        literal += sub[i]
                        i += 1
                    else:
                        break
                if not literal:  # nothing was consumed, e.g. a stray ']' or '}'
                    raise _UnsupportedPattern(f"unsupported character: {c}")
                state["i"] = i
                seq.append((literal, True))
        return join_seq()

    rule = to_rule(transform())
    if state["depth"] != 0:
        raise _InvalidPattern("unbalanced parentheses")
    return add_rule(name, f'"\\"" ({rule}) "\\""')
