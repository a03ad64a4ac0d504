"""Upstream's fixed GBNF rules, and the small writers of GBNF text that the JSON Schema converter uses.

The primitives (``space``, ``value``, ``string``, ``integer``, the date and time formats, ...) are those
of llama.cpp's ``common/json-schema-to-grammar.cpp`` at the pinned commit, character for character: a
grammar that names them accepts the same language as upstream's. :func:`_literal`, :func:`_dump` and
:func:`_repetition` are upstream's format_literal, nlohmann ``dump()`` and build_repetition.

They sit at the bottom of the converter's modules, importing none of them, because each of the
others writes these pieces: the schema walk (``_schema_converter``), the pattern translation
(``_regex_pattern``) and the reader (``_schema_reader``, which compares enum values as literals).
"""

from __future__ import annotations

import json
import re
from typing import Any

# ---------------------------------------------------------------------------------------------
# Upstream's fixed rules (json-schema-to-grammar.cpp), character for character.

SPACE_RULE = '| " " | "\\n"{1,2} [ \\t]{0,20}'

PRIMITIVE_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolean": ('("true" | "false")', ()),
    "decimal-part": ("[0-9]{1,16}", ()),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", ()),
    "number": ('("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)?',
               ("integral-part", "decimal-part")),
    "integer": ('("-"? integral-part)', ("integral-part",)),
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" space ( string ":" space value ("," space string ":" space value)* )? space "}"',
               ("string", "value")),
    "array": ('"[" space ( value ("," space value)* )? space "]"', ("value",)),
    "uuid": ('"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} '
             '"-" [0-9a-fA-F]{12} "\\""', ()),
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\bfnrt] | "u" [0-9a-fA-F]{4})', ()),
    "string": ('"\\"" char* "\\""', ("char",)),
    "null": ('"null"', ()),
}

STRING_FORMAT_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "date": ('[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )', ()),
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
             '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )', ()),
    "date-time": ('date "T" time', ("date", "time")),
    "date-string": ('"\\"" date "\\""', ("date",)),
    "time-string": ('"\\"" time "\\""', ("time",)),
    "date-time-string": ('"\\"" date-time "\\""', ("date-time",)),
}

RESERVED_NAMES = frozenset({"root", *PRIMITIVE_RULES, *STRING_FORMAT_RULES})

_LITERAL_ESCAPE = re.compile(r'[\r\n"\\]')
_LITERAL_ESCAPES = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}


# ---------------------------------------------------------------------------------------------
# GBNF helpers (upstream's build_repetition, format_literal).

def _dump(value: Any) -> str:
    """JSON text as upstream's nlohmann ``dump()``: compact, UTF-8 kept, keys in their order."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _literal(text: str) -> str:
    return '"' + _LITERAL_ESCAPE.sub(lambda m: _LITERAL_ESCAPES[m.group(0)], text) + '"'


def _repetition(item: str, min_items: int, max_items: int | None, separator: str = "") -> str:
    if max_items == 0:
        return ""
    if min_items == 0 and max_items == 1:
        return item + "?"
    if not separator:
        if min_items == 1 and max_items is None:
            return item + "+"
        if min_items == 0 and max_items is None:
            return item + "*"
        return f"{item}{{{min_items},{'' if max_items is None else max_items}}}"
    result = item + " " + _repetition(f"({separator} {item})", 0 if min_items == 0 else min_items - 1,
                                      None if max_items is None else max_items - 1)
    return f"({result})?" if min_items == 0 else result
