"""Structured output and the full sampler set, in Python and in the server, against llama-server.

Grammars (GBNF), JSON schemas, logit bias and upstream's other samplers are built once in the
sequence's sampler chain, so the sync stream, the async stream and the server all get them.
"""

from __future__ import annotations

import asyncio
import json
import math
import os

import httpx
import jsonschema
import openai
import pytest
from inprocess_server import serving
from pydantic import BaseModel, Field

import mullama

YES_NO = 'root ::= ("yes" | "no") "."'
LIST = 'root ::= "- " item ("\\n- " item){2}\nitem ::= [a-z]+'
PROMPTS = ["Is the sky blue? Answer:", "Name three fruits:\n"]


def upstream(llama_server, prompt: str, n_predict: int, **options) -> dict:
    return llama_server.post("/completion", {
        "prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
        "return_tokens": True, "samplers": ["top_k", "temperature"], **options})


@pytest.mark.parametrize("grammar", [YES_NO, LIST])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_with_a_grammar_equals_llama_server(context, llama_server, grammar, prompt):
    ours = context.generate(prompt, max_tokens=32, grammar=grammar)
    reference = upstream(llama_server, prompt, 32, grammar=grammar)
    assert ours.token_ids == reference["tokens"]
    assert ours.text == reference["content"]
    if grammar == YES_NO:
        assert ours.finish_reason == "stop"  # the grammar completes, then only end-of-generation fits


@pytest.mark.parametrize("grammar, reason", [
    ('root ::= "unterminated', "unexpected end of input"),  # the parser's reasons, printed to stderr by llama.cpp
    ("root ::= item", "undefined rule 'item'"),  # found in Python first (mullama/_gbnf_check.py)
    ('root ::= "a" (', "expecting ')'"),
    ('rot ::= "a"', "no rule named 'root'"),  # in Python too (llama.cpp logs "does not contain a 'root' symbol")
    ('root ::= root "a"', "left recursion detected"),  # logged without a newline
])
def test_a_broken_grammar_says_why_in_the_exception(context, capfd, grammar, reason):
    with pytest.raises(mullama.InvalidConfigError) as info:
        context.generate_stream("Hi", grammar=grammar)
    assert reason in str(info.value) and info.value.code == "INVALID_CONFIG"
    assert "error parsing grammar" not in capfd.readouterr().err  # in the exception, not on stderr


def test_capturing_llama_cpp_output_passes_on_what_others_print(model, capfd):
    """Standard error is redirected while a grammar is made: what anyone else prints meanwhile still
    reaches it, and what the block claims does not."""
    from mullama.native import _library

    def claim(text):
        return text[:4], text[4:]

    with _library.capture_output(claim) as said:
        os.write(2, b"minesomeone else\n")
    assert said.stderr == "mine"
    assert capfd.readouterr().err == "someone else\n"


def test_a_broken_grammar_is_refused_before_decoding(context):
    before = context.cached_tokens
    with pytest.raises(mullama.InvalidConfigError) as info:
        context.generate_stream("Hi", grammar='root ::= "unterminated')
    assert info.value.code == "INVALID_CONFIG" and "grammar" in str(info.value)
    assert context.cached_tokens == before
    with pytest.raises(mullama.InvalidConfigError):
        mullama.StreamConfig(grammar="root ::= x", json_schema={"type": "object"})


def test_logit_bias_bans_a_token_as_llama_server_does(context, model, llama_server):
    prompt = "The capital of France is"
    plain = context.generate(prompt, max_tokens=8).token_ids
    banned = plain[0]
    ours = context.generate(prompt, max_tokens=8, logit_bias={banned: -math.inf})
    assert banned not in ours.token_ids
    assert ours.token_ids == upstream(llama_server, prompt, 8, logit_bias=[[banned, False]])["tokens"]
    with pytest.raises(mullama.InvalidConfigError, match="logit_bias"):
        context.generate_stream(prompt, logit_bias={model.vocab_size + 5: -1.0})


@pytest.mark.parametrize("options, upstream_options", [
    ({"typical_p": 0.5}, {"typical_p": 0.5, "samplers": ["typ_p", "top_k", "temperature"]}),
    ({"dry_multiplier": 0.8, "dry_allowed_length": 1},
     {"dry_multiplier": 0.8, "dry_allowed_length": 1, "samplers": ["dry", "top_k", "temperature"]}),
])
def test_other_samplers_at_temperature_zero_equal_llama_server(context, llama_server, options, upstream_options):
    prompt = "one two one two one two one two"
    ours = context.generate(prompt, max_tokens=24, **options)
    assert ours.token_ids == upstream(llama_server, prompt, 24, **upstream_options)["tokens"]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age"]}


def async_json_text(model, prompt: str, max_tokens: int, schema) -> str:
    """The greedy text of ``prompt`` under ``schema`` through an AsyncModel of ``model``."""
    async def scenario():
        async_model = mullama.AsyncModel(model, parallel=1, n_ctx=1024)
        try:
            return [t.text async for t in async_model.generate_stream(prompt, max_tokens=max_tokens, temperature=0,
                                                                      json_schema=schema)]
        finally:
            await asyncio.to_thread(async_model.engine.close)

    return "".join(asyncio.run(scenario()))


def test_a_json_schema_constrains_sync_and_async_streams(context, model):
    prompt = model.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}])
    text = context.generate(prompt, max_tokens=120, json_schema=SCHEMA).text
    jsonschema.validate(json.loads(text), SCHEMA)

    assert async_json_text(model, prompt, 120, SCHEMA) == text


class Pet(BaseModel):
    name: str = Field(max_length=12)
    legs: int = Field(ge=0, le=8)


def test_json_schema_takes_a_pydantic_model_as_openai_does(context, model):
    """A pydantic model class (anything with model_json_schema()) is its JSON Schema, in StreamConfig
    and in every keyword option."""
    assert mullama.StreamConfig(json_schema=Pet).json_schema == Pet.model_json_schema()
    assert mullama.StreamConfig(json_schema=Pet).with_options(max_tokens=5).json_schema == Pet.model_json_schema()
    messages = [{"role": "user", "content": "Describe a pet as JSON."}]
    prompt = model.apply_chat_template(messages)
    result = context.generate(prompt, max_tokens=60, json_schema=Pet)
    assert result.finish_reason == "stop" and Pet.model_validate_json(result.text).name
    assert result.text == context.generate(prompt, max_tokens=60, json_schema=Pet.model_json_schema()).text
    chat = "".join(t.text for t in context.chat_stream(messages, max_tokens=60, temperature=0, json_schema=Pet))
    assert Pet.model_validate_json(chat)

    assert async_json_text(model, prompt, 60, Pet) == result.text
    with pytest.raises(mullama.InvalidConfigError, match="json_schema"):
        mullama.StreamConfig(json_schema=Pet(name="Rex", legs=4).model_dump_json())  # JSON text is not a schema


@pytest.fixture(scope="module")
def served(model):
    with serving(model, parallel=2, n_ctx=1024) as (server, _engine):
        yield server


class Person(BaseModel):
    name: str
    age: int


def test_openai_parse_with_a_pydantic_model(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    completion = client.beta.chat.completions.parse(
        model="smollm2:135m", temperature=0, max_tokens=100, response_format=Person,
        messages=[{"role": "user", "content": "Invent a person and give their name and age."}])
    person = completion.choices[0].message.parsed
    assert isinstance(person, Person) and person.name


def test_response_format_json_object_and_empty_tools(served):
    response = httpx.post(served.url + "/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": "Reply with a JSON object with one key, ok, set to true."}],
        "max_tokens": 200, "temperature": 0, "response_format": {"type": "json_object"}, "tools": [],
        "tool_choice": None})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    if choice["finish_reason"] == "stop":  # the grammar's object is complete
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:  # (a model that rambles on until max_tokens still stays inside an object)
        assert choice["message"]["content"].startswith("{")
    bad = httpx.post(served.url + "/v1/completions", json={"prompt": "x", "grammar": "root ::= ("})
    assert bad.status_code == 400 and "grammar" in bad.json()["error"]["message"]
    tools = httpx.post(served.url + "/v1/chat/completions", json={  # tools and a response format: a call or JSON
        "messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function", "function": {
            "name": "f", "description": "Greets", "parameters": {"type": "object", "properties": {
                "name": {"type": "string"}}}}}],  # (a bare {"name": "f"}: the model loops in nested JSON)
        "response_format": {"type": "json_object"}, "max_tokens": 60, "temperature": 0}, timeout=300)
    assert tools.status_code == 200
    message = tools.json()["choices"][0]["message"]
    assert message.get("tool_calls") or isinstance(json.loads(message["content"]), dict)


def test_a_grammar_that_cannot_finish_ends_with_length(context):
    result = context.generate("Count:", max_tokens=12, grammar='root ::= "a"+')
    assert result.finish_reason == "length" and set(result.text) == {"a"}


# --- logprobs -----------------------------------------------------------------------------------
def test_logprobs_equal_llama_server_n_probs(context, model, llama_server):
    prompt = "The capital of France is"
    tokens = list(context.generate_stream(prompt, max_tokens=12, temperature=0, logprobs=5))
    reference = llama_server.post("/completion", {
        "prompt": prompt, "n_predict": 12, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
        "samplers": ["top_k", "temperature"], "n_probs": 5, "return_tokens": True})
    upstream_probs = reference["completion_probabilities"]
    assert [t.id for t in tokens] == reference["tokens"]
    for ours, theirs in zip(tokens, upstream_probs):
        assert ours.logprob == pytest.approx(theirs["logprob"], abs=1e-3)
        assert [top.id for top in ours.top_logprobs] == [top["id"] for top in theirs["top_logprobs"]]
        for top, their_top in zip(ours.top_logprobs, theirs["top_logprobs"]):
            assert top.logprob == pytest.approx(their_top["logprob"], abs=1e-3)
            assert top.bytes == bytes(their_top["bytes"])
    plain = list(context.generate_stream(prompt, max_tokens=4, temperature=0))
    assert plain[0].logprob is None and plain[0].top_logprobs == ()  # no cost unless asked


def test_logprobs_in_the_server_chat_and_completions(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Say hello."}]
    answer = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert content and all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in content)
    assert "".join(entry.token for entry in content) == answer.choices[0].message.content
    streamed = list(client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0,
                                                   logprobs=True, top_logprobs=3, stream=True))
    streamed_entries = [entry for c in streamed if c.choices and c.choices[0].logprobs
                        for entry in c.choices[0].logprobs.content]
    assert [e.token for e in streamed_entries] == [e.token for e in content]
    legacy = client.completions.create(model="m", prompt="The capital of France is", max_tokens=5, temperature=0,
                                       logprobs=2)
    assert len(legacy.choices[0].logprobs.tokens) == len(legacy.choices[0].logprobs.token_logprobs) > 0
    bad = httpx.post(served.url + "/v1/chat/completions", json={"messages": messages, "top_logprobs": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"


# --- n choices, seeds ------------------------------------------------------------------------
def test_n_choices_streamed_and_not(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Tell me a story about a fox."}]
    answer = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=1.0,
                                            seed=7, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) > 1  # seed + i: the choices differ
    again = client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=1.0,
                                           seed=7, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in answer.choices]
    assert 3 <= answer.usage.completion_tokens <= 3 * 12  # the sum over the choices
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=0,
                                                 n=2, stream=True, stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts[0] == texts[1] and texts[0]  # greedy: the same answer twice
    assert set(finishes) == {0, 1}
    assert chunks[-1].usage.completion_tokens % 2 == 0  # two identical greedy choices, summed
    too_many = httpx.post(served.url + "/v1/chat/completions", json={"messages": messages, "n": 9})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"
