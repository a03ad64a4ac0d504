"""A chat's JSON answer as upstream's chat route gives it at our pin: the model may write the JSON in a
```json fence (small models reach for it), the content is the JSON alone, and greedy answers equal
llama-server's /v1/chat/completions with the same response_format, token for token — through the
Python API and through our server, on SmolLM2's own template and on one from the pinned tree."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
import upstream

import mullama
from mullama.structured._response_format import JsonFence

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
FORMATS = [({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}, PERSON),
           ({"type": "json_object"}, {"type": "object"})]
CONVERSATIONS = [
    [{"role": "user", "content": "Describe a cat as JSON."}],
    [{"role": "user", "content": "Invent a person: name and age."}],
    # These make the model open a ```json fence.
    [{"role": "user", "content": "Write a markdown code block with JSON describing a dog."}],
    [{"role": "system", "content": "Always answer with a ```json code block."},
     {"role": "user", "content": "Describe a dog."}],
]
MAX_TOKENS = 60


def reference(server: upstream.LlamaServer, messages: list[dict], response_format: dict) -> dict:
    return server.post("/v1/chat/completions", {
        "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "cache_prompt": False,
        "response_format": response_format})


def check_equal(stream: mullama.TokenStream, pieces: list[str], expected: dict) -> None:
    choice = expected["choices"][0]
    assert stream.text == choice["message"]["content"]
    assert "".join(pieces) == stream.text  # streamed pieces join to the content: no fence, no edge whitespace
    assert stream.tokens_generated() == expected["usage"]["completion_tokens"]
    assert stream.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert stream.finish_reason == choice["finish_reason"]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["cat", "person", "code-block", "system-fence"])
@pytest.mark.parametrize(("response_format", "schema"), FORMATS, ids=["json_schema", "json_object"])
def test_chat_json_equals_llama_server_on_the_own_template(context, llama_server, messages, response_format,
                                                           schema):
    expected = reference(llama_server, messages, response_format)
    stream = context.chat_stream(messages, max_tokens=MAX_TOKENS, temperature=0, json_schema=schema,
                                 cache_prompt=False, timeout_ms=None)
    pieces = [token.text for token in stream]
    check_equal(stream, pieces, expected)
    if stream.finish_reason == "stop":
        jsonschema.validate(json.loads(stream.text), schema)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["cat", "person", "code-block", "system-fence"])
def test_chat_json_equals_llama_server_on_a_template_from_the_pinned_tree(model_path, qwen_template,
                                                                          qwen_server, messages):
    response_format, schema = FORMATS[0]
    expected = reference(qwen_server, messages, response_format)
    with mullama.Model.load(model_path, chat_template=qwen_template) as model, \
            mullama.Context(model, n_ctx=4096) as context:
        stream = context.chat_stream(messages, max_tokens=MAX_TOKENS, temperature=0, json_schema=schema,
                                     cache_prompt=False, timeout_ms=None)
        pieces = [token.text for token in stream]
    check_equal(stream, pieces, expected)


def test_the_fence_is_really_taken_off(model):
    """The code-block conversations are answered in a fence: the tokens hold it, the content does not."""
    with mullama.Context(model, n_ctx=2048) as context:
        stream = context.chat_stream(CONVERSATIONS[2], max_tokens=MAX_TOKENS, temperature=0, json_schema=PERSON,
                                     timeout_ms=None)
        list(stream)
    written = b"".join(model._cached_piece(token) for token in stream.token_ids).decode()
    assert written.startswith("```json") and written.rstrip().endswith("```")
    assert stream.text == written.strip().removeprefix("```json").removesuffix("```").strip()
    jsonschema.validate(json.loads(stream.text), PERSON)


def test_the_server_route_equals_llama_server_streamed_and_not(served, llama_server):
    for messages in CONVERSATIONS:
        response_format = FORMATS[0][0]
        expected = reference(llama_server, messages, response_format)
        body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "cache_prompt": False,
                "response_format": response_format}
        ours = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=300).json()
        assert ours["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
        assert ours["usage"] == {key: expected["usage"][key] for key in ours["usage"]}
        text = []
        with httpx.stream("POST", served.url + "/v1/chat/completions", json={**body, "stream": True},
                          timeout=300) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    text += [choice["delta"].get("content") or "" for choice in json.loads(line[6:])["choices"]]
        assert "".join(text) == ours["choices"][0]["message"]["content"]


def test_a_completion_has_no_fence(context):
    """generate_stream(json_schema=...) is llama-server's /completion: JSON from the first token."""
    completion = context.generate("A person as JSON:", max_tokens=40, temperature=0, json_schema=PERSON,
                                  timeout_ms=None)
    written = b"".join(context.model._cached_piece(token) for token in completion.token_ids).decode()
    assert written.startswith("{") and completion.text == written


@pytest.mark.parametrize(("pieces", "content"), [
    (["```", "json", "\n", '{"a": 1}', "\n", "```"], '{"a": 1}'),
    (["  ", '{"a"', ': "x ` y  "', "}", "  \n"], '{"a": "x ` y  "}'),
    (["```json\n", '{"s": "', "```", '"}', "\n```\n"], '{"s": "```"}'),
    (["\n", "```json", " ", "\n", "[1, 2]", " ", "```"], "[1, 2]"),
])
def test_json_fence_streams_the_json_alone(pieces, content):
    fence = JsonFence()
    released = [fence.feed(piece) for piece in pieces]
    assert "".join(released) + fence.finish() == content
