"""The JSON Schema keywords the converter knows, and the reading of their values.

Which keywords are annotations (accepted anywhere), which JSON type each assertion applies to, and
:func:`_check_keywords`: every keyword of a schema object is enforced by the grammar, an annotation,
or about a type the schema excludes; anything else raises :class:`~mullama.InvalidConfigError`
naming it and where it is, where upstream would quietly ignore it. The value readers (counts,
bounds, string formats) refuse what the grammar cannot express the same way.

They read one schema object at a time and build nothing: the tree is ``_schema_reader``'s, which
calls them. :func:`_error` is the error of every module of the converter: a message at a place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from .._exceptions import InvalidConfigError
from ._gbnf_check import MAX_REPETITION

# ---------------------------------------------------------------------------------------------
# Keywords: which ones are annotations, and which type each assertion applies to.

#: Annotations and containers: they never constrain a value, so they are accepted anywhere.
METADATA_KEYWORDS = frozenset({
    "title", "description", "examples", "example", "default", "$schema", "$id", "$comment", "$anchor",
    "$dynamicAnchor", "$vocabulary", "deprecated", "readOnly", "writeOnly", "contentEncoding",
    "contentMediaType", "discriminator", "externalDocs", "xml", "$defs", "definitions", "strict",
})

#: Assertions that only apply to one JSON type: next to an explicit ``type`` that excludes that
#: type they constrain nothing (``{"type": "integer", "maxLength": 3}``), so they are harmless there.
_KEYWORD_FAMILY = {
    **dict.fromkeys(("minLength", "maxLength", "pattern", "format", "contentSchema"), "string"),
    **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"), "number"),
    **dict.fromkeys(("items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems",
                     "contains", "minContains", "maxContains", "unevaluatedItems"), "array"),
    **dict.fromkeys(("properties", "required", "additionalProperties", "patternProperties",
                     "propertyNames", "minProperties", "maxProperties", "dependentRequired",
                     "dependentSchemas", "dependencies", "unevaluatedProperties"), "object"),
}
_TYPE_FAMILY = {"string": "string", "integer": "number", "number": "number", "array": "array",
                "object": "object", "boolean": "boolean", "null": "null"}
JSON_TYPES = frozenset(_TYPE_FAMILY)
STRING_FORMATS = ("date", "time", "date-time", "uuid")


def _error(path: str, message: str) -> InvalidConfigError:
    return InvalidConfigError(f"JSON schema at {path}: {message}")


# ---------------------------------------------------------------------------------------------
# Checking and reading keywords.

_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties"})
_NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"})


def _declared_types(schema: Mapping[str, Any], path: str, default: set[str]) -> set[str]:
    kind = schema.get("type")
    if kind is None:
        return default
    kinds = kind if isinstance(kind, list) else [kind]
    for one in kinds:
        if not isinstance(one, str) or one not in JSON_TYPES:
            raise _error(path, f"unrecognized type {one!r} (expected one of {', '.join(sorted(JSON_TYPES))})")
    return set(kinds)


def _check_keywords(schema: Mapping[str, Any], used: set[str], path: str) -> None:
    """Every keyword is enforced by the grammar, an annotation, or about a type the schema excludes."""
    declared = _declared_types(schema, path, set())
    families = {_TYPE_FAMILY[t] for t in declared}
    for key in schema:
        if key in used or key in METADATA_KEYWORDS or not isinstance(key, str) or key.startswith("x-"):
            continue
        family = _KEYWORD_FAMILY.get(key)
        if family is not None and declared and family not in families:
            continue  # e.g. maxLength next to "type": "integer": it constrains nothing
        if family is None and key not in _KNOWN_UNSUPPORTED:
            raise _error(path, f"unknown keyword {key!r}: the grammar cannot enforce it (annotations such as "
                               "title, description, default, examples and x-... are fine)")
        raise _error(path, f"keyword {key!r} is not supported here: the grammar cannot enforce it "
                           f"({_hint(key, schema)})")


_KNOWN_UNSUPPORTED = frozenset({"not", "if", "then", "else", "allOf", "anyOf", "oneOf", "const", "enum",
                                "type", "$ref", "$dynamicRef", "$recursiveRef", "unevaluatedProperties"})


def _hint(key: str, schema: Mapping[str, Any]) -> str:
    if key == "anyOf" and "oneOf" in schema:
        return "use either oneOf or anyOf, not both"
    if key == "allOf":
        return "allOf is supported alone or with \"type\", not next to properties, anyOf or $ref"
    if key in {"format", "minLength", "maxLength", "pattern"}:
        return "string keywords need \"type\": \"string\" or a schema without other structure"
    if key in {"prefixItems", "items"}:
        return "use prefixItems for a tuple or items for a list"
    return "remove it, or express the constraint with supported keywords"


def _check_not_combined(schema: Mapping[str, Any], path: str, key: str, others: tuple[str, ...]) -> None:
    for other in others:
        if other in schema:
            raise _error(path, f"keyword {other!r} together with {key!r} is not supported: the grammar would "
                               f"only enforce {key!r}")


def _count(schema: Mapping[str, Any], key: str, path: str, default: int) -> int:
    found = _count_or_none(schema, key, path)
    return default if found is None else found


def _count_or_none(schema: Mapping[str, Any], key: str, path: str) -> int | None:
    if key not in schema:
        return None
    value = schema[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1e9 is an integer in JSON Schema
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _error(path, f"\"{key}\" must be a non-negative integer")
    if key.startswith("min") and value > MAX_REPETITION:
        raise _error(path, f"{key} {value} is larger than the limit {MAX_REPETITION} (llama.cpp's "
                           "largest repetition count)")
    return value


def _string_format(schema: Mapping[str, Any], path: str) -> str | None:
    if "format" not in schema:
        return None
    value = schema["format"]
    if not isinstance(value, str):
        raise _error(path, "\"format\" must be a string")
    if value in ("date", "time", "date-time"):
        return value
    if value == "uuid" or (len(value) == 5 and value.startswith("uuid") and value[4] in "12345"):
        return "uuid"
    return None


def _decimal(value: Any, key: str, path: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(path, f"\"{key}\" must be a number")
    try:
        result = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    except InvalidOperation:
        raise _error(path, f"\"{key}\" must be a finite number") from None
    if not result.is_finite():
        raise _error(path, f"\"{key}\" must be a finite number")
    return result


def _bounds(schema: Mapping[str, Any], path: str) -> tuple[tuple[Decimal, bool] | None, tuple[Decimal, bool] | None]:
    """The tightest (bound, exclusive) below and above, from draft 6+ or draft 4 keywords."""
    def side(inclusive_key: str, exclusive_key: str, tighter: Callable[[Decimal, Decimal], bool]):
        found: tuple[Decimal, bool] | None = None
        exclusive = schema.get(exclusive_key)
        if inclusive_key in schema:
            found = (_decimal(schema[inclusive_key], inclusive_key, path), exclusive is True)
        elif isinstance(exclusive, bool):
            raise _error(path, f"a boolean \"{exclusive_key}\" needs \"{inclusive_key}\"")
        if exclusive is not None and not isinstance(exclusive, bool):
            bound = _decimal(exclusive, exclusive_key, path)
            if found is None or tighter(bound, found[0]) or bound == found[0]:
                found = (bound, True)
        return found

    return (side("minimum", "exclusiveMinimum", lambda a, b: a > b),
            side("maximum", "exclusiveMaximum", lambda a, b: a < b))


def _floor(value: Decimal) -> int:
    return int(value.to_integral_value(rounding="ROUND_FLOOR"))
