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

    >>> json_schema_to_grammar({"type": "boolean"})
    'root ::= ("true" | "false")\\nspace ::= | " " | "\\\\n"{1,2} [ \\\\t]{0,20}\\n'
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from .._exceptions import InvalidConfigError
from ._gbnf_check import MAX_REPETITION

__all__ = ["grammar", "json_object_grammar", "json_schema_rules", "json_schema_to_grammar"]

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

_INVALID_RULE_CHARS = re.compile(r"[^a-zA-Z0-9-]+")
_LITERAL_ESCAPE = re.compile(r'[\r\n"\\]')
_LITERAL_ESCAPES = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}
_NON_LITERAL = frozenset("|.()[]{}*+?^$")
_ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS = frozenset("^$.[](){}|*+?")
MAX_PATTERN_DEPTH = 100
#: The grammar-size budget of one schema: enum values, anyOf/oneOf alternatives and properties in total
#: (20,000 enum strings decode for minutes; the largest schema of the corpus has a few dozen). Half of the
#: GBNF limit on alternatives, so that the grammar of a schema within budget (with a chat answer's fence,
#: number ranges) always passes :func:`~mullama.structured._gbnf_check.check_grammar`.
MAX_SCHEMA_ITEMS = 1_000
_SHORTHANDS = {"d": "0-9", "w": "a-zA-Z0-9_"}  # safe inside a JSON string as they are

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
# The schema tree (upstream's common_chat_schema), built from JSON by _Reader.

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


class _Reader:
    """JSON to schema tree, as upstream's common_chat_schema_builder, checking every keyword."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, _Node | None] = {}
        self.pending: list[_Ref] = []
        self.type_checks: list[tuple[_Node, set[str], str]] = []
        self.all_ofs: list[_AllOf] = []
        self.items = 0  # enum values, alternatives and properties read so far: see _spend

    def _spend(self, count: int, path: str, what: str) -> None:
        """Count ``count`` more items against the grammar-size budget (:data:`MAX_SCHEMA_ITEMS`)."""
        self.items += count
        if self.items > MAX_SCHEMA_ITEMS:
            raise _error(path, f"{what} take the schema past the grammar-size budget of {MAX_SCHEMA_ITEMS} enum "
                               "values, anyOf/oneOf alternatives and properties in total (a larger grammar "
                               "decodes for minutes)")

    def read(self) -> _Node:
        node = self.node(self.root, "#")
        for ref in self.pending:
            ref.target = self.refs[ref.ref]
        for checked, declared, path in self.type_checks:
            types = _value_types(checked)
            if not _types_fit(types, declared):
                raise _error(path, f"the subschema allows {sorted(types)} but \"type\" says {sorted(declared)}; "
                                   "a \"type\" next to $ref/anyOf/oneOf/allOf must agree with them")
        for all_of in self.all_ofs:
            _check_all_of(all_of)
        return node

    # --- one schema ---------------------------------------------------------------------------
    def node(self, schema: Any, path: str) -> _Node:
        if schema is True:
            return _Any()
        if schema is False:
            raise _error(path, "the schema `false` (no value is valid) is not supported")
        if not isinstance(schema, Mapping):
            raise _error(path, f"a schema must be an object or a boolean, not {type(schema).__name__}")
        nullable = schema.get("nullable", False)
        if not isinstance(nullable, bool):
            raise _error(path, "\"nullable\" must be a boolean")
        node, used = self._node(schema, path)
        _check_keywords(schema, used | {"nullable"}, path)
        if nullable and "null" not in _declared_types(schema, path, set()):
            return _AnyOf([node, _Null()])
        return node

    def _node(self, schema: Mapping[str, Any], path: str) -> tuple[_Node, set[str]]:
        """The node and the keywords it enforces (for a "type" array, those of any alternative)."""
        if "$ref" in schema:
            return self._with_type(schema, self._ref(schema["$ref"], path), {"$ref"}, path)
        if "oneOf" in schema or "anyOf" in schema:
            key = "oneOf" if "oneOf" in schema else "anyOf"  # upstream reads oneOf when both are there
            alternatives = _AnyOf(self._alternatives(schema[key], f"{path}/{key}"))
            return self._with_type(schema, alternatives, {key}, path)

        kind = schema.get("type")
        if isinstance(kind, list):
            # {"type": ["a", "b"], ...} is {"anyOf": [{"type": "a", ...}, {"type": "b", ...}]}
            if not kind:
                raise _error(path, "\"type\" must not be empty")
            children: list[_Node] = []
            used = {"type"}
            for i, one in enumerate(kind):
                alternative = dict(schema)
                alternative["type"] = one
                child, child_used = self._node(alternative, f"{path}/type/{i}")
                children.append(child)
                used |= child_used
            return _AnyOf(children), used
        if "const" in schema:
            self._check_values([schema["const"]], schema, path, "const")
            return _Const(schema["const"]), {"const", "type"}
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise _error(path, "\"enum\" must be a non-empty array")
            self._spend(len(values), path, f"{len(values)} enum values")
            self._check_values(values, schema, path, "enum")
            return _Enum(list(values)), {"enum", "type"}
        if kind is not None and not isinstance(kind, str):
            raise _error(path, "\"type\" must be a string or an array of strings")

        additional = schema.get("additionalProperties")
        has_properties = "properties" in schema or ("additionalProperties" in schema and additional is not True)
        if not kind:
            # without a type the structural keywords decide, in upstream's order
            if has_properties:
                return self._object(schema, path), set(_OBJECT_KEYWORDS)
            if "allOf" in schema:
                return self._all_of(schema, path), {"allOf"}
            if "items" in schema or "prefixItems" in schema:
                return self._array(schema, path)
            if ("pattern" in schema or "minLength" in schema or "maxLength" in schema
                    or _string_format(schema, path) is not None):
                return self._string(schema, path)
            return _Any(), set()
        if kind == "object":
            if not has_properties and "allOf" in schema:
                return self._all_of(schema, path), {"allOf", "type"}
            return self._object(schema, path), {*_OBJECT_KEYWORDS, "type"}
        if kind == "string":
            if "allOf" in schema:
                return self._all_of(schema, path), {"allOf", "type"}
            string, used = self._string(schema, path)
            return string, used | {"type"}
        if kind == "array":
            node, used = self._array(schema, path)
            return node, used | {"type"}
        if kind == "integer":
            return self._integer(schema, path), {*_NUMBER_KEYWORDS, "type"}
        if kind == "number":
            return self._number(schema, path), {*_NUMBER_KEYWORDS, "type"}
        if kind == "boolean":
            return _Boolean(), {"type"}
        if kind == "null":
            return _Null(), {"type"}
        raise _error(path, f"unrecognized type {kind!r} (expected one of {', '.join(sorted(JSON_TYPES))})")

    def _with_type(self, schema: Mapping[str, Any], node: _Node, used: set[str], path: str) -> tuple[_Node, set[str]]:
        if "type" in schema:
            self.type_checks.append((node, _declared_types(schema, path, set()), path))
            used = used | {"type"}
        return node, used

    def _check_values(self, values: list[Any], schema: Mapping[str, Any], path: str, key: str) -> None:
        if "type" not in schema:
            return
        declared = _declared_types(schema, path, set())
        for value in values:
            if not _types_fit({_json_type(value)}, declared):
                raise _error(path, f"{key} value {json.dumps(value)} does not have the schema's type "
                                   f"{schema['type']!r}")

    def _alternatives(self, alternatives: Any, path: str) -> list[_Node]:
        if not isinstance(alternatives, list):
            raise _error(path, "must be an array of schemas")
        if not alternatives:
            raise _error(path, "must not be empty")
        self._spend(len(alternatives), path, f"{len(alternatives)} alternatives")
        return [self.node(alternative, f"{path}/{i}") for i, alternative in enumerate(alternatives)]

    def _all_of(self, schema: Mapping[str, Any], path: str) -> _AllOf:
        node = _AllOf(self._alternatives(schema["allOf"], f"{path}/allOf"), f"{path}/allOf")
        self.all_ofs.append(node)
        return node

    # --- $ref ----------------------------------------------------------------------------------
    def _ref(self, ref: Any, path: str) -> _Ref:
        if not isinstance(ref, str):
            raise _error(path, "\"$ref\" must be a string")
        if ref != "#" and not ref.startswith("#/"):
            raise _error(path, f"unsupported $ref {ref!r}: only references into the same document "
                               "(\"#/$defs/...\", \"#/definitions/...\") are supported, not remote ones")
        if ref not in self.refs:
            self._check_ref_cycle(ref, path)
            self.refs[ref] = None  # reserve the key first, so that a cycle back to this $ref stops here
            self.refs[ref] = self.node(self._resolve(ref, path), ref)
        node = _Ref(ref)
        self.pending.append(node)
        return node

    def _check_ref_cycle(self, ref: str, path: str) -> None:
        """Refuse a $ref that leads back to itself through schemas that are only references (or
        anyOf/oneOf of them): its grammar rule would be left-recursive, which llama.cpp refuses."""
        def left_refs(schema: Any) -> list[str]:
            if not isinstance(schema, Mapping):
                return []
            if isinstance(schema.get("$ref"), str):
                return [schema["$ref"]]
            key = "oneOf" if "oneOf" in schema else "anyOf"
            alternatives = schema.get(key)
            if not isinstance(alternatives, list):
                return []
            return [found for alternative in alternatives for found in left_refs(alternative)]

        def visit(current: str, chain: list[str], seen: set[str]) -> None:
            try:
                target = self._resolve(current, path)
            except InvalidConfigError:
                return  # reported where it is read
            for following in left_refs(target):
                if following == ref:
                    raise _error(path, f"$ref cycle at {' → '.join([path, *chain, ref])}: each schema is only "
                                       "a reference to the next, so no value could ever be generated")
                if following.startswith("#") and following not in seen:
                    seen.add(following)
                    visit(following, [*chain, following], seen)

        visit(ref, [ref], {ref})

    def _resolve(self, ref: str, path: str) -> Any:
        target = self.root
        for token in ref[1:].split("/")[1:]:
            key = urllib.parse.unquote(token).replace("~1", "/").replace("~0", "~")
            if isinstance(target, Mapping) and key in target:
                target = target[key]
            elif isinstance(target, list):
                index = int(key) if key.isdigit() else len(target)
                if index >= len(target):
                    raise _error(path, f"cannot resolve $ref {ref}, {token} is out of range")
                target = target[index]
            else:
                raise _error(path, f"cannot resolve $ref {ref}, {token} not found")
        return target

    # --- objects -------------------------------------------------------------------------------
    def _object(self, schema: Mapping[str, Any], path: str) -> _Object:
        node = _Object()
        required: set[str] = set()
        names = schema.get("required", [])
        if isinstance(names, list):
            required = {name for name in names if isinstance(name, str)}
        properties = schema.get("properties", {})
        if not isinstance(properties, Mapping):
            raise _error(path, "\"properties\" must be an object")
        self._spend(len(properties), path, f"{len(properties)} properties")
        for name, prop in properties.items():
            node.properties.append((name, self.node(prop, f"{path}/properties/{name}"), name in required))
        missing = sorted(required - set(properties))
        if missing:
            raise _error(path, f"\"required\" names {missing}, which \"properties\" does not define: "
                               "the grammar could not make them appear")

        if "additionalProperties" in schema:
            additional = schema["additionalProperties"]
            if additional is True:
                node.additional = _Any()
            elif additional is False:
                node.additional = None
            elif isinstance(additional, Mapping):
                node.additional = self.node(additional, f"{path}/additionalProperties")
            else:
                raise _error(path, "\"additionalProperties\" must be a boolean or a schema")
        elif "properties" not in schema:
            node.additional = _Any()  # {"type": "object"} on its own accepts any object
        return node

    # --- arrays --------------------------------------------------------------------------------
    def _array(self, schema: Mapping[str, Any], path: str) -> tuple[_Node, set[str]]:
        used = {"minItems", "maxItems"}
        min_items = _count(schema, "minItems", path, 0)
        max_items = _count_or_none(schema, "maxItems", path)
        if schema.get("uniqueItems") is False:
            used.add("uniqueItems")
        items = schema.get("items")
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list) and "items" in schema and items is not False:
            raise _error(path, "\"items\" after \"prefixItems\" (a tuple with more items of a schema) is not "
                               "supported: upstream's converter would drop the prefixItems")
        if isinstance(items, list) or isinstance(prefix, list):
            tuple_key = "items" if isinstance(items, list) else "prefixItems"
            elements: list[Any] = items if isinstance(items, list) else prefix  # type: ignore[assignment]
            used |= {tuple_key}
            if tuple_key == "prefixItems" and items is False:
                used.add("items")
            if tuple_key == "items" and schema.get("additionalItems") is False:
                used.add("additionalItems")
            # upstream's tuple is exactly one item per schema: fine if minItems/maxItems allow that
            count = len(elements)
            if min_items > count or (max_items is not None and max_items < count):
                raise _error(path, f"a tuple of {count} items with minItems {min_items} / maxItems {max_items} "
                                   "is not supported (the grammar gives exactly one item per prefixItems schema)")
            node = _Tuple([self.node(item, f"{path}/{tuple_key}/{i}") for i, item in enumerate(elements)])
            return node, used
        if "items" in schema or "prefixItems" in schema:
            key = "items" if "items" in schema else "prefixItems"  # upstream: a schema is the item schema
            used.add(key)
            item_node = self.node(schema[key], f"{path}/{key}")
        else:
            item_node = _Any()
        if max_items is not None and min_items > max_items:
            raise _error(path, f"minItems {min_items} is more than maxItems {max_items}")
        return _Array(item_node, min_items, max_items), used

    # --- strings -------------------------------------------------------------------------------
    def _string(self, schema: Mapping[str, Any], path: str) -> tuple[_String, set[str]]:
        node = _String(path=path)
        if "pattern" in schema:
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                raise _error(path, "\"pattern\" must be a string")
            node.pattern = pattern
            _check_not_combined(schema, path, "pattern", ("format", "minLength", "maxLength"))
            return node, {"pattern"}
        node.format = _string_format(schema, path)
        if "format" in schema and node.format is None:
            raise _error(path, f"string format {schema['format']!r} is not supported (the grammar can enforce "
                               f"{', '.join(STRING_FORMATS)}); drop \"format\" or use a \"pattern\"")
        if node.format is not None:
            _check_not_combined(schema, path, "format", ("minLength", "maxLength"))
            return node, {"format"}
        node.min_length = _count(schema, "minLength", path, 0)
        node.max_length = _count_or_none(schema, "maxLength", path)
        if node.max_length is not None and node.min_length > node.max_length:
            raise _error(path, f"minLength {node.min_length} is more than maxLength {node.max_length}")
        return node, {"minLength", "maxLength"}

    # --- numbers -------------------------------------------------------------------------------
    def _integer(self, schema: Mapping[str, Any], path: str) -> _Integer:
        lower, upper = _bounds(schema, path)
        node = _Integer()
        if lower is not None:
            bound, exclusive = lower
            node.minimum = _floor(bound) + 1 if exclusive else -_floor(-bound)
        if upper is not None:
            bound, exclusive = upper
            node.maximum = -_floor(-bound) - 1 if exclusive else _floor(bound)
        if node.minimum is not None and node.maximum is not None and node.minimum > node.maximum:
            raise _error(path, "no integer lies within its minimum and maximum")
        return node

    def _number(self, schema: Mapping[str, Any], path: str) -> _Number:
        lower, upper = _bounds(schema, path)
        if lower is not None and upper is not None and (
                lower[0] > upper[0] or (lower[0] == upper[0] and (lower[1] or upper[1]))):
            raise _error(path, "no number lies within its minimum and maximum")
        return _Number(lower, upper)


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


def _check_all_of(node: _AllOf) -> None:
    """Upstream merges allOf's objects (their properties, all required) or intersects its enums;
    other components would be dropped, so they are refused."""
    kinds: set[str] = set()
    names: set[str] = set()
    enum_sets: list[set[str]] = []

    def component(child: _Node, seen: frozenset[int]) -> None:
        if isinstance(child, _Ref):
            if child.target is not None and id(child.target) not in seen:
                component(child.target, seen | {id(child.target)})
        elif isinstance(child, _Object):
            kinds.add("object")
            for name, _, _ in child.properties:
                if name in names:
                    raise _error(node.path, f"two allOf components define the property {name!r}")
                names.add(name)
        elif isinstance(child, _Enum):
            kinds.add("enum")
            enum_sets.append({_literal(_dump(value)) for value in child.values})
        elif not isinstance(child, _Any):
            raise _error(node.path, f"allOf can only combine objects (merged) or enums (intersected), not "
                                    f"{type(child).__name__.lstrip('_').lower()} schemas")

    for child in node.children:
        if isinstance(child, _AnyOf):
            for alternative in child.children:
                component(alternative, frozenset())
        else:
            component(child, frozenset())
    if kinds == {"object", "enum"}:
        raise _error(node.path, "allOf cannot combine objects with enums")
    if kinds == {"enum"} and (len(enum_sets) != len(node.children) or not set.intersection(*enum_sets)):
        raise _error(node.path, "allOf's enums have no value in common")


# ---------------------------------------------------------------------------------------------
# GBNF helpers (upstream's build_repetition, build_min_max_int, format_literal).

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


# ---------------------------------------------------------------------------------------------
# The converter (upstream's common_chat_schema_converter).

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


def _class_char(char: str) -> str:
    """A character inside ``[...]``: as is, unless GBNF would read it as syntax."""
    if char in "\\]-":
        return "\\" + char
    if char == "^" or ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\x{ord(char):02X}"
    return char


class _Converter:
    def __init__(self) -> None:
        self.rules: dict[str, str] = {"space": SPACE_RULE}
        self.refs_being_resolved: set[str] = set()

    def add_rule(self, name: str, rule: str) -> str:
        esc_name = _INVALID_RULE_CHARS.sub("-", name)
        if esc_name not in self.rules or self.rules[esc_name] == rule:
            self.rules[esc_name] = rule
            return esc_name
        i = 0
        while f"{esc_name}{i}" in self.rules and self.rules[f"{esc_name}{i}"] != rule:
            i += 1
        key = f"{esc_name}{i}"
        self.rules[key] = rule
        return key

    def add_primitive(self, name: str, rule: tuple[str, tuple[str, ...]]) -> str:
        result = self.add_rule(name, rule[0])
        for dep in rule[1]:
            dep_rule = PRIMITIVE_RULES.get(dep) or STRING_FORMAT_RULES[dep]
            if dep not in self.rules:
                self.add_primitive(dep, dep_rule)
        return result

    def visit_primitive(self, rule_name: str, kind: str) -> str:
        return self.add_primitive("root" if rule_name == "root" else kind, PRIMITIVE_RULES[kind])

    def format_grammar(self) -> str:
        return "".join(f"{name} ::= {rule}\n" for name, rule in sorted(self.rules.items()))

    # --- one node ------------------------------------------------------------------------------
    def visit(self, node: _Node, name: str) -> str:
        rule_name = name + "-" if name in RESERVED_NAMES else (name or "root")
        sub_name = name + "-" if name else ""

        if isinstance(node, _Ref):
            return self.add_rule(rule_name, self.resolve_ref(node))
        if isinstance(node, _AnyOf):
            alternatives = [self.visit(child, f"{name}{'-' if name else 'alternative-'}{i}")
                            for i, child in enumerate(node.children)]
            return self.add_rule(rule_name, " | ".join(alternatives))
        if isinstance(node, _AllOf):
            return self.visit_all_of(node, name, rule_name)
        if isinstance(node, _Const):
            return self.add_rule(rule_name, _literal(_dump(node.value)))
        if isinstance(node, _Enum):
            return self.add_rule(rule_name, "(" + " | ".join(_literal(_dump(v)) for v in node.values) + ")")
        if isinstance(node, _Object):
            if not node.properties and isinstance(node.additional, _Any):
                return self.add_rule(rule_name, self.add_primitive("object", PRIMITIVE_RULES["object"]))
            properties = [(prop_name, schema) for prop_name, schema, _ in node.properties]
            required = {prop_name for prop_name, _, is_required in node.properties if is_required}
            return self.add_rule(rule_name, self.build_object_rule(properties, required, name, node.additional))
        if isinstance(node, _Tuple):
            items = ' "," space '.join(self.visit(item, f"{sub_name}tuple-{i}") for i, item in enumerate(node.items))
            return self.add_rule(rule_name, f'"[" space {items} space "]"')
        if isinstance(node, _Array):
            if isinstance(node.items, _Any) and node.min_items == 0 and node.max_items is None:
                return self.visit_primitive(rule_name, "array")
            item_rule = self.visit(node.items, sub_name + "item")
            repeated = _repetition(item_rule, node.min_items, node.max_items, '"," space')
            return self.add_rule(rule_name, f'"[" space {repeated} space "]"')
        if isinstance(node, _String):
            return self.visit_string(node, rule_name)
        if isinstance(node, _Integer):
            if node.minimum is None and node.maximum is None:
                return self.visit_primitive(rule_name, "integer")
            out = ["("]
            _min_max_int(node.minimum, node.maximum, out)
            out.append(")")
            return self.add_rule(rule_name, "".join(out))
        if isinstance(node, _Number):
            if node.lower is None and node.upper is None:
                return self.visit_primitive(rule_name, "number")
            return self.add_rule(rule_name, _number_rule(node))
        if isinstance(node, _Boolean):
            return self.visit_primitive(rule_name, "boolean")
        if isinstance(node, _Null):
            return self.visit_primitive(rule_name, "null")
        return self.add_rule(rule_name, self.add_primitive("value", PRIMITIVE_RULES["value"]))

    def visit_string(self, node: _String, rule_name: str) -> str:
        if node.pattern is not None:
            try:
                return self.pattern_to_rule(node.pattern, rule_name)
            except _UnsupportedPattern as error:
                raise _error(node.path, f"pattern {node.pattern!r} is not supported ({error}); the grammar "
                                        "supports anchored patterns (^...$) of literals, ., [...] classes, "
                                        "groups, |, *, +, ? and {m,n}") from None
            except _InvalidPattern as error:
                raise _error(node.path, f"invalid pattern {node.pattern!r}: {error}") from None
        if node.format == "uuid":
            return self.visit_primitive(rule_name, "uuid")
        if node.format is not None:
            primitive = node.format + "-string"
            return self.add_rule(rule_name, self.add_primitive(primitive, STRING_FORMAT_RULES[primitive]))
        if node.min_length > 0 or node.max_length is not None:
            char_rule = self.add_primitive("char", PRIMITIVE_RULES["char"])
            repeated = _repetition(char_rule, node.min_length, node.max_length)
            return self.add_rule(rule_name, f'"\\"" {repeated} "\\""')
        return self.visit_primitive(rule_name, "string")

    def resolve_ref(self, node: _Ref) -> str:
        fragment = node.ref.split("#", 1)[1] if "#" in node.ref else node.ref
        ref_name = "ref" + _INVALID_RULE_CHARS.sub("-", fragment)
        if ref_name not in self.rules and node.ref not in self.refs_being_resolved:
            assert node.target is not None
            self.refs_being_resolved.add(node.ref)
            ref_name = self.visit(node.target, ref_name)
            self.refs_being_resolved.discard(node.ref)
        return ref_name

    def visit_all_of(self, node: _AllOf, name: str, rule_name: str) -> str:
        required: set[str] = set()
        properties: list[tuple[str, _Node]] = []
        enum_values: dict[str, int] = {}

        def add_component(component: _Node, is_required: bool) -> None:
            if isinstance(component, _Ref):
                if component.target is not None:
                    add_component(component.target, is_required)
            elif isinstance(component, _Object):
                for prop_name, schema, _ in component.properties:
                    properties.append((prop_name, schema))
                    if is_required:
                        required.add(prop_name)
            elif isinstance(component, _Enum):
                for value in component.values:
                    literal = _literal(_dump(value))
                    enum_values[literal] = enum_values.get(literal, 0) + 1

        for child in node.children:
            if isinstance(child, _AnyOf):
                for alternative in child.children:
                    add_component(alternative, False)
            else:
                add_component(child, True)
        if enum_values:
            common = [literal for literal, count in sorted(enum_values.items()) if count == len(node.children)]
            if common:
                return self.add_rule(rule_name, "(" + " | ".join(common) + ")")
        return self.add_rule(rule_name, self.build_object_rule(properties, required, name, None))

    def build_object_rule(self, properties: list[tuple[str, _Node]], required: set[str], name: str,
                          additional: _Node | None) -> str:
        prefix = name + "-" if name else ""
        required_props: list[str] = []
        optional_props: list[str] = []
        kv_rules: dict[str, str] = {}
        prop_names: list[str] = []
        for prop_name, schema in properties:
            prop_rule = self.visit(schema, prefix + prop_name)
            kv_rules[prop_name] = self.add_rule(
                f"{prefix}{prop_name}-kv", f'{_literal(_dump(prop_name))} space ":" space {prop_rule}')
            (required_props if prop_name in required else optional_props).append(prop_name)
            prop_names.append(prop_name)
        if additional is not None:
            sub_name = prefix + "additional"
            value_rule = (self.visit(additional, sub_name + "-value") if not isinstance(additional, _Any)
                          else self.add_primitive("value", PRIMITIVE_RULES["value"]))
            key_rule = (self.add_primitive("string", PRIMITIVE_RULES["string"]) if not prop_names
                        else self.add_rule(sub_name + "-k", self.not_strings(prop_names)))
            kv_rules["*"] = self.add_rule(sub_name + "-kv", f'{key_rule} ":" space {value_rule}')
            optional_props.append("*")

        if not required_props and not optional_props:
            return '"{" space "}"'
        rule = '"{" space ' + ' "," space '.join(kv_rules[k] for k in required_props)
        if optional_props:
            rule += " ("
            if required_props:
                rule += ' "," space ( '

            def recursive_refs(keys: list[str], first_is_optional: bool) -> str:
                if not keys:
                    return ""
                key = keys[0]
                kv_rule = kv_rules[key]
                comma_ref = f'( "," space {kv_rule} )'
                if first_is_optional:
                    result = comma_ref + ("*" if key == "*" else "?")
                else:
                    result = kv_rule + (" " + comma_ref + "*" if key == "*" else "")
                if len(keys) > 1:
                    result += " " + self.add_rule(f"{prefix}{key}-rest", recursive_refs(keys[1:], True))
                return result

            rule += " | ".join(recursive_refs(optional_props[i:], False) for i in range(len(optional_props)))
            if required_props:
                rule += " )"
            rule += " )?"
        return rule + ' space "}"'

    def not_strings(self, strings: list[str]) -> str:
        """A JSON string that is none of ``strings`` (upstream's _not_strings, over a trie)."""
        children: list[dict[str, int]] = [{}]
        ends = [False]
        for word in strings:
            current = 0
            for char in word:
                if char not in children[current]:
                    children.append({})
                    ends.append(False)
                    children[current][char] = len(children) - 1
                current = children[current][char]
            ends[current] = True

        char_rule = self.add_primitive("char", PRIMITIVE_RULES["char"])
        out = ['["] ( ']

        def visit(index: int) -> None:
            rejects = ""
            for i, char in enumerate(sorted(children[index])):
                child = children[index][char]
                rejects += _class_char(char)
                if i:
                    out.append(" | ")
                out.append(f"[{_class_char(char)}]")
                if children[child]:
                    out.append(" (")
                    visit(child)
                    out.append(")")
                else:
                    out.append(f" {char_rule}+")
            if children[index]:
                out.append(f' | [^"{rejects}] {char_rule}*')

        visit(0)
        out.append(" )")
        if not ends[0]:
            out.append("?")
        out.append(' ["]')
        return "".join(out)

    # --- pattern -------------------------------------------------------------------------------
    def pattern_to_rule(self, pattern: str, name: str) -> str:
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
                    seq.append((self.add_rule("dot", "[^\\x0A\\x0D]"), False))
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
                            sub_rule_ids[text] = self.add_rule(f"{name}-{len(sub_rule_ids)}", text)
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
        return self.add_rule(name, f'"\\"" ({rule}) "\\""')


# ---------------------------------------------------------------------------------------------

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
