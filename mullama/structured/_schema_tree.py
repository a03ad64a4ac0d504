"""The schema tree (upstream's common_chat_schema): a JSON Schema read into typed nodes.

``_schema_reader`` builds it from JSON, checking every keyword; ``_schema_converter`` walks it to
write GBNF. A tree between the two lets what depends on the whole schema (``$ref`` targets and
cycles, a ``type`` next to ``anyOf``, ``allOf``) be checked before a rule is written.
:func:`_value_types` is the set of JSON types a node lets through, as upstream's value_types.

The names keep their leading underscore: they belong to the converter's modules, not to the API.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ._schema_keywords import JSON_TYPES


@dataclass(eq=False)
class _Any:
    pass


@dataclass(eq=False)
class _Ref:
    ref: str
    target: _Node | None = None


@dataclass(eq=False)
class _AnyOf:
    children: list[_Node]


@dataclass(eq=False)
class _AllOf:
    children: list[_Node]
    path: str = "#"


@dataclass(eq=False)
class _Const:
    value: Any


@dataclass(eq=False)
class _Enum:
    values: list[Any]


@dataclass(eq=False)
class _Null:
    pass


@dataclass(eq=False)
class _Boolean:
    pass


@dataclass(eq=False)
class _Number:
    """``lower`` / ``upper``: (bound, exclusive) or None. Upstream has no bounds on numbers."""

    lower: tuple[Decimal, bool] | None = None
    upper: tuple[Decimal, bool] | None = None


@dataclass(eq=False)
class _Integer:
    minimum: int | None = None  # inclusive; None: unbounded
    maximum: int | None = None


@dataclass(eq=False)
class _String:
    pattern: str | None = None
    format: str | None = None  # "uuid", "date", "time", "date-time"
    min_length: int = 0
    max_length: int | None = None
    path: str = "#"


@dataclass(eq=False)
class _Array:
    items: _Node
    min_items: int = 0
    max_items: int | None = None


@dataclass(eq=False)
class _Tuple:
    items: list[_Node]


@dataclass(eq=False)
class _Object:
    properties: list[tuple[str, _Node, bool]] = field(default_factory=list)  # (name, schema, required)
    additional: _Node | None = None  # None: no other properties


_Node = (_Any | _Ref | _AnyOf | _AllOf | _Const | _Enum | _Null | _Boolean | _Number | _Integer | _String
         | _Array | _Tuple | _Object)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    return "object"


def _value_types(node: _Node, visiting: set[int] | None = None) -> set[str]:
    """The JSON types a value matching ``node`` may have (upstream's value_types)."""
    visiting = set() if visiting is None else visiting
    if isinstance(node, _Any):
        return set(JSON_TYPES)
    if isinstance(node, _Null):
        return {"null"}
    if isinstance(node, _Boolean):
        return {"boolean"}
    if isinstance(node, _Number):
        return {"number", "integer"}
    if isinstance(node, _Integer):
        return {"integer"}
    if isinstance(node, _String):
        return {"string"}
    if isinstance(node, (_Array, _Tuple)):
        return {"array"}
    if isinstance(node, _Object):
        return {"object"}
    if isinstance(node, _Const):
        return {_json_type(node.value)}
    if isinstance(node, _Enum):
        return {_json_type(value) for value in node.values}
    if isinstance(node, _Ref):
        if node.target is None or id(node.target) in visiting:
            return set()  # a cycle contributes no type
        visiting.add(id(node.target))
        types = _value_types(node.target, visiting)
        visiting.discard(id(node.target))
        return types
    if isinstance(node, _AnyOf):
        return set().union(*(_value_types(child, visiting) for child in node.children))
    types = set(JSON_TYPES)
    for child in node.children:
        types &= _value_types(child, visiting)
    return types


def _types_fit(types: set[str], declared: set[str]) -> bool:
    return all(t in declared or (t == "integer" and "number" in declared) for t in types)
