"""Schema tree to GBNF rules: upstream's common_chat_schema_converter, rule for rule.

:class:`_Converter` walks the nodes of ``_schema_tree`` and adds one named rule per node, upstream's
way (the same rule names, the same de-duplication of names, properties in schema order with the
required ones first, additional properties as strings that are none of the named ones), so that the
grammar of a schema upstream converts is the same text. Integer and number bounds come from
``_number_ranges``, ``pattern`` from ``_regex_pattern``; the fixed rules from ``_gbnf_rules``.
"""

from __future__ import annotations

import re

from ._gbnf_rules import PRIMITIVE_RULES, RESERVED_NAMES, SPACE_RULE, STRING_FORMAT_RULES, _dump, _literal, _repetition
from ._number_ranges import _min_max_int, _number_rule
from ._regex_pattern import _InvalidPattern, _UnsupportedPattern, pattern_to_rule
from ._schema_keywords import _error
from ._schema_tree import (
    _AllOf,
    _Any,
    _AnyOf,
    _Array,
    _Boolean,
    _Const,
    _Enum,
    _Integer,
    _Node,
    _Null,
    _Number,
    _Object,
    _Ref,
    _String,
    _Tuple,
)

_INVALID_RULE_CHARS = re.compile(r"[^a-zA-Z0-9-]+")


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
                return pattern_to_rule(self.add_rule, node.pattern, rule_name)
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
