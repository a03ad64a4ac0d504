"""JSON Schema -> GBNF (mullama.structured._json_schema): the languages the grammars accept, and what is refused.

Languages are checked by llama.cpp itself: a string is fed token by token to the real grammar
sampler (tests/grammar_engine.py), so "accepts" below is what constrained generation can produce.
Schemas, keywords and patterns the grammar cannot enforce raise INVALID_CONFIG naming them;
annotations are harmless. (Upstream's own cases and the corpus: tests/test_json_schema.py.)
"""

from __future__ import annotations

import random
from decimal import Decimal

import pytest
from grammar_engine import Engine, language

import mullama
from mullama.structured._json_schema import METADATA_KEYWORDS, json_object_grammar, json_schema_to_grammar


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model)


# --------------------------------------------------------------------------------------------
# What the grammars accept.

def test_whitespace_order_and_required_as_upstream(engine):
    schema = {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "integer"},
                                               "c": {"type": "boolean"}}, "required": ["a", "b"]}
    assert language(engine, schema, [
        '{"b": "x", "a": 1}', '{"b":"x","a":1,"c":true}', '{\n  "b": "x",\n  "a": 1\n}',
        '{"a": 1, "b": "x"}',  # required properties come in schema order
        '{"b": "x"}',  # a required property is missing
        '{"b": "x", "a": 1, "d": 0}',  # with "properties", no others unless additionalProperties
        '{"b" : "x", "a" : 1 }',  # upstream's space comes after ':' and ',', and before '}', not before ':'
        '{"b": "x","a": 1}',
        '{"b": "x", "a": 1}\n',  # nothing after the value
    ]) == {'{"b": "x", "a": 1}': True, '{"b":"x","a":1,"c":true}': True, '{\n  "b": "x",\n  "a": 1\n}': True,
           '{"a": 1, "b": "x"}': False, '{"b": "x"}': False, '{"b": "x", "a": 1, "d": 0}': False,
           '{"b" : "x", "a" : 1 }': True, '{"b": "x","a": 1}': True, '{"b": "x", "a": 1}\n': False}


def test_additional_properties(engine):
    assert language(engine, {"type": "object"}, ['{"any": [1, {"x": null}]}', "[]"]) == {
        '{"any": [1, {"x": null}]}': True, "[]": False}
    counts = {"type": "object", "additionalProperties": {"type": "integer"}}
    assert language(engine, counts, ['{"a": 1, "b": 2}', '{"a": "1"}', "{}"]) == {
        '{"a": 1, "b": 2}': True, '{"a": "1"}': False, "{}": True}


def test_json_object_grammar_is_any_object(engine):
    assert json_object_grammar() == json_schema_to_grammar({"type": "object"})
    with engine.acceptor(json_object_grammar()) as acceptor:
        assert acceptor.accepts('{"a": [1, 2.5, "x", true, null, {}]}')
        assert acceptor.accepts("{}")
        assert not acceptor.accepts("[1]") and not acceptor.accepts('"text"') and not acceptor.accepts("1")


def test_empty_schema_and_true_are_any_value(engine):
    assert json_schema_to_grammar(True) == json_schema_to_grammar({}) == json_schema_to_grammar({"title": "x"})
    assert all(language(engine, True, ["1", '"a"', "[]", "null", '{"a": 1}']).values())


def test_type_arrays_and_nullable(engine):
    texts = ['"a"', "null", "1"]
    expected = {'"a"': True, "null": True, "1": False}
    assert language(engine, {"type": ["string", "null"]}, texts) == expected
    assert language(engine, {"anyOf": [{"type": "string"}, {"type": "null"}]}, texts) == expected
    assert language(engine, {"type": "string", "nullable": True}, texts) == expected  # OpenAPI 3.0
    # a keyword for one type of a type array applies to that type only
    assert language(engine, {"type": ["string", "null"], "maxLength": 2}, ['"ab"', '"abc"', "null"]) == {
        '"ab"': True, '"abc"': False, "null": True}


def test_enum_const_and_refs(engine):
    schema = {"$defs": {"Color": {"enum": ["red", "green"], "type": "string"}},
              "type": "object", "properties": {"c": {"$ref": "#/$defs/Color"}, "k": {"const": {"x": [1]}}},
              "required": ["c", "k"]}
    assert language(engine, schema, ['{"c": "red", "k": {"x":[1]}}', '{"c": "blue", "k": {"x":[1]}}',
                                     '{"c": "red", "k": {"x": [1]}}']) == {
        '{"c": "red", "k": {"x":[1]}}': True, '{"c": "blue", "k": {"x":[1]}}': False,
        '{"c": "red", "k": {"x": [1]}}': False}  # a const is its compact JSON text, as upstream


def test_recursive_ref(engine):
    schema = {"$ref": "#/$defs/Node", "$defs": {"Node": {
        "type": "object", "properties": {"name": {"type": "string"},
                                         "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
        "required": ["name"]}}}
    assert language(engine, schema, ['{"name": "a", "children": [{"name": "b", "children": []}]}',
                                     '{"name": "a", "children": [{"children": []}]}']) == {
        '{"name": "a", "children": [{"name": "b", "children": []}]}': True,
        '{"name": "a", "children": [{"children": []}]}': False}


def test_arrays_and_tuples(engine):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}
    assert language(engine, schema, ["[]", "[1]", "[1, 2]", "[1, 2, 3]"]) == {
        "[]": False, "[1]": True, "[1, 2]": True, "[1, 2, 3]": False}
    pair = {"type": "array", "prefixItems": [{"type": "number"}, {"type": "string"}], "minItems": 2, "maxItems": 2}
    assert language(engine, pair, ['[1.5, "a"]', '["a", 1.5]', "[1.5]"]) == {
        '[1.5, "a"]': True, '["a", 1.5]': False, "[1.5]": False}


def test_string_lengths_and_formats(engine):
    assert language(engine, {"type": "string", "minLength": 2, "maxLength": 3}, ['"a"', '"ab"', '"abcd"']) == {
        '"a"': False, '"ab"': True, '"abcd"': False}
    formats = {
        "date": (['"2024-02-29"'], ['"2024-13-01"', '"24-01-01"']),
        "time": (['"12:30:00Z"', '"23:59:59.123+02:00"'], ['"24:00:00Z"', '"12:30:00"']),
        "date-time": (['"2024-02-29T12:30:00Z"'], ['"2024-02-29 12:30:00Z"']),
        "uuid": (['"123e4567-e89b-12d3-a456-426614174000"'], ['"123e4567e89b12d3a456426614174000"']),
    }
    for name, (good, bad) in formats.items():
        result = language(engine, {"type": "string", "format": name}, good + bad)
        assert result == {**dict.fromkeys(good, True), **dict.fromkeys(bad, False)}, name


def test_patterns(engine):
    assert language(engine, {"type": "string", "pattern": r"^\d{5}$"}, ['"12345"', '"1234"', '"1234a"']) == {
        '"12345"': True, '"1234"': False, '"1234a"': False}
    schema = {"type": "string", "pattern": "^(?:[A-Z]{2}|X)-[0-9]+(\\.[0-9]+)?$"}
    assert language(engine, schema, ['"AB-12"', '"X-1.5"', '"ABC-1"', '"AB-"']) == {
        '"AB-12"': True, '"X-1.5"': True, '"ABC-1"': False, '"AB-"': False}


def canonical_integer(rnd: random.Random) -> int:
    return rnd.choice([rnd.randint(-20, 20), rnd.randint(-1200, 1200), rnd.randint(-10**6, 10**6)])


def test_integer_bounds_against_python(engine):
    """Upstream's digit-range rules, ported, on random bounds (canonical integers only: for a
    negative maximum upstream's rule, and so ours, also lets "-05" through)."""
    rnd = random.Random(14)
    pool = [0, 1, 5, 9, 10, 15, 23, 99, 100, 101, 105, 250, 1000, 1005, 2050, 99999]
    for _ in range(40):
        schema: dict = {"type": "integer"}
        low, high = rnd.choice([None, *pool, *(-p for p in pool)]), rnd.choice([None, *pool, *(-p for p in pool)])
        if low is not None:
            schema[rnd.choice(["minimum", "exclusiveMinimum"])] = low
        if high is not None:
            schema[rnd.choice(["maximum", "exclusiveMaximum"])] = high
        try:
            grammar = json_schema_to_grammar(schema)
        except mullama.InvalidConfigError:
            assert low is not None and high is not None and low >= high - 1  # no integer in range
            continue
        values = {canonical_integer(rnd) for _ in range(40)} | set(pool) | {-p for p in pool}
        values |= {v + d for v in (low, high) if v is not None for d in (-1, 0, 1)}
        with engine.acceptor(grammar) as acceptor:
            for value in sorted(values):
                expected = (schema.get("minimum", -10**9) <= value and schema.get("exclusiveMinimum", -10**9) < value
                            and value <= schema.get("maximum", 10**9) and value < schema.get("exclusiveMaximum", 10**9))
                assert acceptor.accepts(str(value)) == expected, (schema, value, grammar)


def test_number_bounds_against_decimal(engine):
    """Not in upstream (it ignores them): bounds on numbers, exact, without an exponent."""
    rnd = random.Random(7)
    pool = [0, 0.5, 1, 1.5, 2, 10, 12.25, 99.99, 100, -0.5, -1, -10, -12.25, 0.05, 0.1, 0.9]
    integers = ["0", "1", "2", "5", "9", "10", "12", "99", "100", "123"]
    fractions = ["", ".0", ".5", ".25", ".05", ".001", ".9", ".99", ".50", ".1", ".49", ".51"]
    checked = 0
    for _ in range(60):
        schema: dict = {"type": "number"}
        low, high = rnd.choice([None, *pool]), rnd.choice([None, *pool])
        if low is not None:
            schema[rnd.choice(["minimum", "exclusiveMinimum"])] = low
        if high is not None:
            schema[rnd.choice(["maximum", "exclusiveMaximum"])] = high
        try:
            grammar = json_schema_to_grammar(schema)
        except mullama.InvalidConfigError:
            assert low is not None and high is not None and low >= high
            continue
        texts = {rnd.choice(["", "-"]) + rnd.choice(integers) + rnd.choice(fractions) for _ in range(50)}
        texts |= {repr(float(v)) for v in pool} | {repr(float(-v)) for v in pool} | {"1e3", "-0"}
        with engine.acceptor(grammar) as acceptor:
            for text in sorted(texts):
                value = Decimal(text)
                expected = "e" not in text and all((
                    "minimum" not in schema or value >= Decimal(repr(schema["minimum"])),
                    "exclusiveMinimum" not in schema or value > Decimal(repr(schema["exclusiveMinimum"])),
                    "maximum" not in schema or value <= Decimal(repr(schema["maximum"])),
                    "exclusiveMaximum" not in schema or value < Decimal(repr(schema["exclusiveMaximum"]))))
                if text.startswith("-0") and value == 0:
                    continue  # "-0" may or may not be offered; both are valid
                assert acceptor.accepts(text) == expected, (schema, text, grammar)
                checked += 1
    assert checked > 1000


# --------------------------------------------------------------------------------------------
# What is refused, and what is harmless.

@pytest.mark.parametrize(("schema", "named"), [
    ({"type": "integer", "multipleOf": 5}, "multipleOf"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
    ({"type": "object", "properties": {"a": {}}, "minProperties": 1}, "minProperties"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "string", "format": "email"}, "'email'"),
    ({"type": "string", "format": "uri", "minLength": 1}, "'uri'"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "maxLength"),
    ({"type": "string", "pattern": "^(?!a)b$"}, "unsupported group syntax"),
    ({"type": "string", "pattern": "^\\s$"}, "unsupported escape: \\s"),
    ({"type": "string", "pattern": "^(a$"}, "unbalanced parentheses"),
    ({"$ref": "https://example.com/schema.json"}, "remote"),
    ({"$ref": "#/$defs/missing", "$defs": {}}, "missing"),
    ({"type": "object", "propertys": {"a": {}}}, "'propertys'"),  # a typo is not ignored
    ({"minimum": 3}, "'minimum'"),  # without a type upstream would give any value
    ({"type": "string", "allOf": [{"minLength": 2}]}, "allOf can only combine"),
    ({"type": "object", "properties": {"a": {}}, "allOf": [{"required": ["a"]}]}, "'allOf'"),
    ({"allOf": [{"enum": [1, 2]}, {"enum": [3]}]}, "no value in common"),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": "string"}}, "prefixItems"),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "minItems": 2}, "minItems 2"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "['b']"),
    ({"anyOf": [{"type": "string"}], "oneOf": [{"type": "integer"}]}, "'anyOf'"),
    ({"type": "string", "enum": ["a", 1]}, "enum value 1"),
    ({"$ref": "#/$defs/n", "type": "string", "$defs": {"n": {"type": "integer"}}}, "\"type\" says"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
    ({"type": "kaboom"}, "'kaboom'"),
    ({"properties": {"a": False}}, "`false`"),
    ("not a schema", "dict"),
])
def test_unsupported_is_invalid_config_naming_it(schema, named):
    with pytest.raises(mullama.InvalidConfigError) as info:
        json_schema_to_grammar(schema)
    assert info.value.code == "INVALID_CONFIG"
    assert named in str(info.value), str(info.value)


def test_annotations_are_harmless():
    plain = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    annotated = {**plain, "properties": {"a": {"type": "integer", **{k: "x" for k in METADATA_KEYWORDS},
                                               "x-order": 1}}}
    assert json_schema_to_grammar(annotated) == json_schema_to_grammar(plain)
    # a keyword about another type than the declared one constrains nothing
    assert json_schema_to_grammar({"type": "integer", "maxLength": 3, "format": "int32"}) == \
        json_schema_to_grammar({"type": "integer"})
    # "uniqueItems": false asks for nothing
    assert json_schema_to_grammar({"type": "array", "uniqueItems": False}) == json_schema_to_grammar({"type": "array"})


def test_draft4_exclusive_bounds_and_root_ref():
    assert json_schema_to_grammar({"type": "integer", "minimum": 3, "exclusiveMinimum": True}) == \
        json_schema_to_grammar({"type": "integer", "minimum": 4})
    assert json_schema_to_grammar({"type": "integer", "minimum": 3, "exclusiveMinimum": 5}) == \
        json_schema_to_grammar({"type": "integer", "minimum": 6})  # the tighter of the two
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}
    assert "ref ::=" in json_schema_to_grammar(tree)


def test_property_names_with_grammar_syntax(engine):
    """Upstream writes the names raw inside [...] when it excludes them from additional keys, so
    ^ ] - \\ break its grammar; here they are escaped."""
    schema = {"type": "object", "properties": {"^a]-\\": {"type": "integer"}}, "additionalProperties": True}
    assert language(engine, schema, ['{"^a]-\\\\": 1}', '{"other": "x"}', '{"^a]-\\\\": "x"}']) == {
        '{"^a]-\\\\": 1}': True, '{"other": "x"}': True, '{"^a]-\\\\": "x"}': False}


def test_deep_nesting_is_invalid_config_not_a_crash():
    schema: dict = {"type": "string"}
    for _ in range(3000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(mullama.InvalidConfigError, match="nested too deeply"):
        json_schema_to_grammar(schema)

