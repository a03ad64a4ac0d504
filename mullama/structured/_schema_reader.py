"""JSON to schema tree (upstream's common_chat_schema_builder), checking every keyword on the way.

:class:`_Reader` turns a JSON Schema into the nodes of ``_schema_tree``: ``$ref`` resolved within the
document (JSON-pointer escapes too, and ``$ref`` cycles that could never produce a value refused), a
``type`` array read as ``anyOf``, OpenAPI's ``nullable``, tuples, bounds. Each schema object's
keywords go through ``_schema_keywords._check_keywords``, and what needs the whole tree (a ``type``
next to ``$ref``/``anyOf``, ``allOf`` components) is checked once every ``$ref`` has its target.

The reader also keeps the grammar-size budget (:data:`MAX_SCHEMA_ITEMS`), counted while reading, so
that a schema whose grammar would decode for minutes is refused before any rule is written.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from typing import Any

from .._exceptions import InvalidConfigError
from ._gbnf_rules import _dump, _literal
from ._schema_keywords import (
    _NUMBER_KEYWORDS,
    _OBJECT_KEYWORDS,
    JSON_TYPES,
    STRING_FORMATS,
    _bounds,
    _check_keywords,
    _check_not_combined,
    _count,
    _count_or_none,
    _declared_types,
    _error,
    _floor,
    _string_format,
)
from ._schema_tree import (
    _AllOf,
    _Any,
    _AnyOf,
    _Array,
    _Boolean,
    _Const,
    _Enum,
    _Integer,
    _json_type,
    _Node,
    _Null,
    _Number,
    _Object,
    _Ref,
    _String,
    _Tuple,
    _types_fit,
    _value_types,
)

#: The grammar-size budget of one schema: enum values, anyOf/oneOf alternatives and properties in total
#: (20,000 enum strings decode for minutes; the largest schema of the corpus has a few dozen). Half of the
#: GBNF limit on alternatives, so that the grammar of a schema within budget (with a chat answer's fence,
#: number ranges) always passes :func:`~mullama.structured._gbnf_check.check_grammar`.
MAX_SCHEMA_ITEMS = 1_000


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

