"""JSON Schema to GBNF: the grammar llama.cpp's sampler needs for ``json_schema`` / ``response_format``.

A port, in Python, of upstream's converter at the pinned commit (``common/json-schema.cpp``, which
reads a schema into a small tree, and ``common/json-schema-to-grammar.cpp``, which writes the tree as
GBNF; llama-server uses both for ``json_schema`` and ``response_format``). For a schema upstream
converts, the grammar here is the same text, rule for rule, so it accepts the same language: the
same whitespace (``space``), properties in schema order, required ones first, no additional
properties unless the schema allows them, the same digit-range rules for integer bounds, the same
regular-expression subset for ``pattern``.

Where upstream would quietly accept more than the schema allows (a keyword it does not convert, a
``pattern`` it cannot translate, ``allOf`` over strings, ...), this module raises
:class:`~mullama.InvalidConfigError` (``INVALID_CONFIG``) naming the keyword and where it is,
instead of ignoring it. Annotations (``title``, ``description``, ``default``, ``examples``,
``$comment``, ``x-...``, ...) are harmless and accepted. Beyond upstream, and only where upstream
fails or ignores the keyword: a boolean schema ``true`` (any value), ``$ref: "#"``, JSON-pointer
escapes in refs, OpenAPI's ``nullable: true``, draft-4 boolean ``exclusiveMinimum`` /
``exclusiveMaximum``, ``items: false`` after ``prefixItems``, and bounds on ``number`` (enforced
exactly, without an exponent).

The conversion is split by concept, each module importing only those before it: ``_gbnf_rules``
(upstream's fixed rules, GBNF literals), ``_schema_keywords`` (which keywords mean what, reading their
values), ``_schema_tree`` (the nodes), ``_schema_reader`` (JSON to tree, every keyword checked, the
grammar-size budget), ``_number_ranges`` (integer and number bounds as digit ranges),
``_regex_pattern`` (``pattern`` to GBNF), ``_schema_converter`` (tree to rules). This module is the
entry point the package imports.

    >>> json_schema_to_grammar({"type": "boolean"})
    'root ::= ("true" | "false")\\nspace ::= | " " | "\\\\n"{1,2} [ \\\\t]{0,20}\\n'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._exceptions import InvalidConfigError
from ._schema_converter import _Converter
from ._schema_keywords import METADATA_KEYWORDS
from ._schema_reader import MAX_SCHEMA_ITEMS, _Reader

__all__ = ["MAX_SCHEMA_ITEMS", "METADATA_KEYWORDS", "grammar", "json_object_grammar", "json_schema_rules",
           "json_schema_to_grammar"]


def json_schema_to_grammar(schema: Mapping[str, Any] | bool) -> str:
    """The GBNF grammar (start rule ``root``) of the JSON values ``schema`` describes.

    Equal to upstream llama.cpp's ``json_schema_to_grammar`` for every schema it converts.
    Raises :class:`~mullama.InvalidConfigError` for a schema, keyword or pattern the grammar cannot
    enforce, naming it and where it is. An empty schema (or ``True``) is any JSON value; note that
    llama-server reads an empty ``json_schema`` as ``{"type": "object"}`` (see
    :func:`json_object_grammar`).
    """
    converter = _Converter()
    _convert(schema, "", converter)
    return converter.format_grammar()


def json_schema_rules(schema: Mapping[str, Any] | bool, name: str) -> tuple[str, dict[str, str]]:
    """The rules of the JSON values ``schema`` describes, named after ``name`` instead of ``root``, to
    stand beside other rules in one grammar (see :func:`grammar`): ``(start symbol, {rule: body})``.
    Errors as :func:`json_schema_to_grammar`."""
    converter = _Converter()
    start = _convert(schema, name, converter)
    return start, converter.rules


def grammar(root: str, *rule_sets: Mapping[str, str]) -> str:
    """A GBNF grammar: ``root ::= <root>`` and every rule of ``rule_sets`` (a name shared by two sets
    must be the same rule in both, as the primitives are)."""
    rules: dict[str, str] = {}
    for rule_set in rule_sets:
        for name, body in rule_set.items():
            if rules.setdefault(name, body) != body:
                raise InvalidConfigError(f"two parts of a grammar define the rule {name!r} differently")
    return f"root ::= {root}\n" + "".join(f"{name} ::= {body}\n" for name, body in sorted(rules.items()))


def _convert(schema: Mapping[str, Any] | bool, name: str, converter: _Converter) -> str:
    """Read ``schema`` and add its rules to ``converter`` as rule ``name`` ("" is ``root``): the start symbol."""
    if not isinstance(schema, (Mapping, bool)):
        raise InvalidConfigError(f"a JSON schema is a dict (or a bool), not {type(schema).__name__}")
    try:
        node = _Reader(schema).read()
        return converter.visit(node, name)
    except RecursionError:
        raise InvalidConfigError("JSON schema is nested too deeply to convert") from None
    except ValueError as error:
        if isinstance(error, InvalidConfigError):
            raise
        raise InvalidConfigError(f"JSON schema cannot be converted: {error}") from None


def json_object_grammar() -> str:
    """Any JSON object: ``response_format: {"type": "json_object"}``, as llama-server converts it
    (``{"type": "object"}``)."""
    return json_schema_to_grammar({"type": "object"})
