"""Grammar hardening (issue 28, items 1-4): no grammar can crash the process or stall the server, and
every refused grammar says why. The crashing cases run in a child Python or against a real
``mullama serve`` process on 127.0.0.1, so that a regression kills the child, not this test run."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import urllib.request

import pytest
from mullama_server import MullamaServer

import mullama
from mullama.structured._gbnf_check import MAX_ALTERNATIVES, MAX_NESTING, MAX_REPETITION, check_grammar, scan
from mullama.structured._json_schema import MAX_SCHEMA_ITEMS, json_schema_to_grammar
from mullama.structured._response_format import chat_json_grammar

EMPTY_ROOT = "root ::= [^\\x00-\\U0010FFFF]"  # a class that matches no character: an empty language
EMPTY_LATER = "root ::= x\nx ::= \"a\" [^\\x00-\\U0010FFFF]"  # empty too, but not visible from the root's text
DEEP = "root ::= " + "(" * 100_000 + "\"a\"" + ")" * 100_000
HUGE_ENUM = {"enum": [str(i) for i in range(100_000)]}  # 0.7 MB: under the 1 MiB body limit


def run_child(code: str, model_path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child Python with ``model_path`` as ``path``; it must not die by a signal."""
    program = f"import mullama\npath = {str(model_path)!r}\n" + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)


# --- 1. an empty language never reaches llama_grammar_accept_impl ---------------------------------
@pytest.mark.parametrize("grammar", [EMPTY_ROOT, EMPTY_LATER], ids=["empty-root", "empty-after-a"])
@pytest.mark.parametrize("options", [{"temperature": 0}, {"temperature": 0.8, "top_k": 40, "seed": 1}],
                         ids=["greedy", "sampled"])
def test_an_empty_language_is_an_error_not_an_abort(model_path, grammar, options):
    """The guard in SamplerChain.sample, on its greedy and sampled paths: the sequence ends with a
    MullamaError naming the grammar, the process (a child: before the guard it died by SIGABRT) lives."""
    done = run_child(f"""
        model = mullama.Model.load(path)
        ctx = mullama.Context(model, n_ctx=512)
        try:
            ctx.generate("Hi", max_tokens=8, grammar={grammar!r}, **{options!r})
        except mullama.MullamaError as error:
            print("ERROR", error.code, error)
        else:
            print("NO ERROR")
        print(repr(ctx.generate("Hi", max_tokens=2, temperature=0)))  # the context still works
        """, model_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "ERROR" in done.stdout and "NO ERROR" not in done.stdout
    assert "grammar" in done.stdout.split("ERROR", 1)[1].splitlines()[0]


def test_an_empty_root_is_refused_before_decoding():
    with pytest.raises(mullama.InvalidConfigError, match="language is empty"):
        check_grammar(EMPTY_ROOT)


# --- 2. nesting depth is checked in Python -------------------------------------------------------
def test_deep_nesting_is_refused_naming_the_limit(model_path):
    done = run_child("""
        model = mullama.Model.load(path)
        ctx = mullama.Context(model, n_ctx=512)
        try:
            ctx.generate("Hi", max_tokens=2, grammar="root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000)
        except mullama.InvalidConfigError as error:
            print("REFUSED", error)
        """, model_path)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "REFUSED" in done.stdout and f"{MAX_NESTING} levels" in done.stdout


def test_nesting_at_the_limit_is_accepted(context):
    grammar = "root ::= " + "(" * MAX_NESTING + "\"a\"" + ")" * MAX_NESTING
    assert context.generate("Hi", max_tokens=2, grammar=grammar).text == "a"


@pytest.mark.parametrize("text,depth", [
    ('root ::= "((((" x\nx ::= ("a")', 1),  # parentheses in a string
    ('root ::= [(] ( "\\"(" )', 1),  # in a class, and an escaped quote in a string
    ('root ::= "a" # ((((( a comment\n', 0),
    ('root ::= ( ( [\\]] ) )', 2),  # an escaped ] in a class
    ('root ::= "\\\\" ( "x" )', 1),  # an escaped backslash ends the string
])
def test_the_scanner_skips_strings_classes_and_comments(text, depth):
    assert scan(text).depth == depth


# --- 3. a grammar-size budget ---------------------------------------------------------------------
def test_a_100k_enum_is_refused_by_the_budget_naming_it():
    with pytest.raises(mullama.InvalidConfigError, match=f"grammar-size budget of {MAX_SCHEMA_ITEMS}") as raised:
        json_schema_to_grammar(HUGE_ENUM)
    assert "100000 enum values" in str(raised.value) and "at #" in str(raised.value)


def test_many_alternatives_in_raw_gbnf_are_refused():
    grammar = "root ::= " + " | ".join(f'"v{i}"' for i in range(MAX_ALTERNATIVES + 2))
    with pytest.raises(mullama.InvalidConfigError, match=f"limit of {MAX_ALTERNATIVES}"):
        check_grammar(grammar)


def test_many_properties_and_any_of_are_refused():
    properties = {f"p{i}": {"type": "integer"} for i in range(MAX_SCHEMA_ITEMS + 1)}
    with pytest.raises(mullama.InvalidConfigError, match="properties take the schema past"):
        json_schema_to_grammar({"type": "object", "properties": properties, "required": list(properties)})
    any_of = [{"type": "object", "properties": {"k": {"const": i}}} for i in range(MAX_SCHEMA_ITEMS + 1)]
    with pytest.raises(mullama.InvalidConfigError, match="alternatives take the schema past"):
        json_schema_to_grammar({"anyOf": any_of})


def test_a_schema_within_the_budget_passes_the_gbnf_check_too():
    """The schema budget leaves room for what is added around a schema's grammar (a chat answer's fence)."""
    schema = {"enum": [f"value-{i}" for i in range(MAX_SCHEMA_ITEMS)]}
    for grammar in (json_schema_to_grammar(schema), chat_json_grammar(schema)):
        assert f"value-{MAX_SCHEMA_ITEMS - 1}" in grammar
        check_grammar(grammar)


# --- 4. errors that say what is wrong, and where ---------------------------------------------------
@pytest.mark.parametrize("schema,expected", [
    ({"$ref": "#/$defs/x", "$defs": {"x": {"$ref": "#/$defs/x"}}}, "$ref cycle at # → #/$defs/x → #/$defs/x"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}},
      "$defs": {"x": {"anyOf": [{"$ref": "#/$defs/y"}, {"type": "null"}]}, "y": {"$ref": "#/$defs/x"}}},
     "$ref cycle at #/properties/a → #/$defs/x → #/$defs/y → #/$defs/x"),
    ({"type": "object", "properties": {"name": {"type": "string", "minLength": 1e9}}},
     f"at #/properties/name: minLength 1000000000 is larger than the limit {MAX_REPETITION}"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1_000_000},
     f"at #: minItems 1000000 is larger than the limit {MAX_REPETITION}"),
])
def test_schema_errors_name_the_cause_and_the_path(schema, expected):
    with pytest.raises(mullama.InvalidConfigError) as raised:
        json_schema_to_grammar(schema)
    assert expected in str(raised.value)


def test_recursion_that_consumes_text_is_still_accepted():
    tree = {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}}
    assert "ref-defs-node" in json_schema_to_grammar(tree)


@pytest.mark.parametrize("grammar,expected", [
    ("root ::= foo", "undefined rule 'foo' in the grammar"),
    ('root ::= "a"{3000}', f"llama.cpp's limit of {MAX_REPETITION}"),
    ('x ::= "a"', "no rule named 'root'"),
])
def test_gbnf_errors_name_the_cause(context, grammar, expected):
    with pytest.raises(mullama.InvalidConfigError, match=re.escape(expected)):
        context.generate("Hi", max_tokens=2, grammar=grammar)


# --- the server answers 4xx and goes on -------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_path):
    running = MullamaServer(model_path, parallel=1, ctx_size=512)
    yield running
    assert running.close() != -signal.SIGABRT


@pytest.mark.parametrize("body,status,needle", [
    ({"grammar": EMPTY_ROOT}, 400, "language is empty"),
    ({"grammar": EMPTY_LATER}, 500, "grammar"),
    ({"grammar": DEEP}, 400, f"{MAX_NESTING} levels"),
    ({"json_schema": HUGE_ENUM}, 400, "grammar-size budget"),
    ({"grammar": "root ::= foo"}, 400, "undefined rule 'foo'"),
])
def test_the_server_refuses_bad_grammars_and_keeps_serving(server, body, status, needle):
    code, answer = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4, **body})
    assert code == status, answer
    assert needle in answer["error"]["message"]
    assert server.process.poll() is None
    code, answer = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert code == 200 and server.get_json("/health")["status"] == "ok"


def counters(server: MullamaServer) -> dict[str, float]:
    """The engine's token counters from the server's /metrics (Prometheus text)."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    names = ("mullama_prompt_tokens_total", "mullama_tokens_generated_total")
    return {line.split()[0]: float(line.split()[1]) for line in lines if line.startswith(names)}


def test_the_huge_enum_is_refused_before_anything_is_decoded(server):
    """The 100k enum is refused by the budget check before decoding: not a prompt token nor a generated
    one is counted (before the budget it decoded for minutes)."""
    server.wait_idle()
    before = counters(server)
    assert len(before) == 2, before
    code, answer = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Pick one"}], "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "pick", "schema": HUGE_ENUM}}})
    assert code == 400 and "grammar-size budget" in answer["error"]["message"], answer
    assert answer["error"]["type"] == "invalid_request_error"
    assert counters(server) == before
