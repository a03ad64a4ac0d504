"""Checks on a GBNF grammar before llama.cpp sees it (issue 28).

llama.cpp's grammar parser is recursive (100,000 nested parentheses overflow the C stack: the process
dies by SIGSEGV), and a grammar of tens of thousands of alternatives is accepted, then decodes for
minutes. :func:`check_grammar` scans the text once, as llama.cpp's parser tokenises it (strings,
character classes, comments, ``<token>`` literals and ``{m,n}`` counts are skipped), and refuses with
:class:`~mullama.InvalidConfigError` naming the limit: the nesting depth of parentheses, the size of
the text, the number of rules and of alternatives, a rule used but never defined, a repetition count
over llama.cpp's own threshold, and a ``root`` that is one character class matching no character
(an empty language: nothing could ever be generated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .._exceptions import InvalidConfigError

__all__ = ["MAX_ALTERNATIVES", "MAX_GRAMMAR_CHARS", "MAX_NESTING", "MAX_REPETITION", "MAX_RULES",
           "GrammarShape", "check_grammar", "scan"]

MAX_NESTING = 1_000  # nested parentheses; llama.cpp's recursive parser overflows the stack near 100,000
MAX_GRAMMAR_CHARS = 512 * 1024  # characters of GBNF text
MAX_RULES = 2_000  # rule definitions
MAX_ALTERNATIVES = 2_000  # '|' alternatives in the whole grammar, every rule and group together
MAX_REPETITION = 2_000  # llama.cpp's MAX_REPETITION_THRESHOLD for {m,n}

_WORD = re.compile(r"[A-Za-z0-9_-]+")
_DEFINES = re.compile(r"[ \t]*::=")
_REPEAT = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")
_EMPTY_CLASS = re.compile(r"\s*root\s*::=\s*\[\^(\\x00|\\u0000|\\U00000000)-(\\U0010[fF]{4})\]\s*$")


@dataclass
class GrammarShape:
    """What :func:`scan` counted in a grammar."""

    depth: int = 0  # deepest nesting of parentheses
    alternatives: int = 0  # '|' outside strings and classes
    max_repetition: int = 0  # the largest m in {m} or {m,n}
    defined: list[str] = field(default_factory=list)  # rule names in definition order
    used: dict[str, int] = field(default_factory=dict)  # rule name -> first offset it is referenced at


def _skip_quoted(text: str, pos: int, end_char: str) -> int:
    """The offset just after the unescaped ``end_char`` closing the string or class opened before ``pos``."""
    n = len(text)
    while pos < n:
        char = text[pos]
        if char == "\\":
            pos += 2
        elif char == end_char:
            return pos + 1
        else:
            pos += 1
    return n


def scan(text: str, *, max_depth: int = MAX_NESTING) -> GrammarShape:
    """Count ``text``'s nesting, alternatives, repetitions and rule names as llama.cpp's parser reads
    them; stops (and raises) as soon as the nesting passes ``max_depth``."""
    shape = GrammarShape()
    depth, pos, n = 0, 0, len(text)
    while pos < n:
        char = text[pos]
        if char == "#":
            newline = text.find("\n", pos)
            pos = n if newline < 0 else newline + 1
        elif char == '"':
            pos = _skip_quoted(text, pos + 1, '"')
        elif char == "[":
            pos = _skip_quoted(text, pos + 1, "]")
        elif char == "<":
            pos = _skip_quoted(text, pos + 1, ">")
        elif char == "(":
            depth += 1
            if depth > max_depth:
                raise InvalidConfigError(f"the grammar nests parentheses more than {max_depth} levels deep "
                                         f"(the limit; at offset {pos})")
            shape.depth = max(shape.depth, depth)
            pos += 1
        elif char == ")":
            depth -= 1
            pos += 1
        elif char == "|":
            shape.alternatives += 1
            pos += 1
        elif char == "{":
            match = _REPEAT.match(text, pos)
            if match and match.group(1):
                shape.max_repetition = max(shape.max_repetition, int(match.group(1)))
            pos = match.end() if match else pos + 1
        elif match := _WORD.match(text, pos):
            name = match.group(0)
            pos = match.end()
            if _DEFINES.match(text, pos):
                shape.defined.append(name)
            else:
                shape.used.setdefault(name, match.start())
        else:
            pos += 1
    return shape


def check_grammar(text: str) -> None:
    """Refuse ``text`` (GBNF) with :class:`~mullama.InvalidConfigError` when llama.cpp could crash on
    it, decode it for minutes, or refuse it without saying why (see the module's docstring)."""
    if len(text) > MAX_GRAMMAR_CHARS:
        raise InvalidConfigError(f"the grammar is {len(text)} characters long, more than the limit of "
                                 f"{MAX_GRAMMAR_CHARS}")
    shape = scan(text)
    if len(shape.defined) > MAX_RULES:
        raise InvalidConfigError(f"the grammar has {len(shape.defined)} rules, more than the limit of {MAX_RULES}")
    if shape.alternatives > MAX_ALTERNATIVES:
        raise InvalidConfigError(f"the grammar has {shape.alternatives} alternatives ('|'), more than the limit "
                                 f"of {MAX_ALTERNATIVES} (larger grammars decode for minutes)")
    if shape.max_repetition > MAX_REPETITION:
        raise InvalidConfigError(f"the grammar repeats an item {shape.max_repetition} times ({{m,n}}), more than "
                                 f"llama.cpp's limit of {MAX_REPETITION}")
    defined = set(shape.defined)
    if "root" not in defined:
        raise InvalidConfigError("the grammar has no rule named 'root' (where generation starts)")
    for name in shape.used:
        if name not in defined:
            raise InvalidConfigError(f"undefined rule {name!r} in the grammar (used but never defined with "
                                     f"'{name} ::= ...')")
    if _EMPTY_CLASS.match(text):
        raise InvalidConfigError("the grammar's language is empty: root is a character class that matches no "
                                 "character, so nothing could ever be generated")
