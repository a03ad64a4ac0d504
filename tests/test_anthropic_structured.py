"""Anthropic's ``output_config`` on the real server and model, driven by the official `anthropic`
SDK: a ``json_schema`` format constrains the answer as the OpenAI route's ``response_format`` does
(the same JSON, which ``messages.parse`` reads into the caller's type), streamed or not; ``effort``
is accepted and changes nothing; a malformed one is Anthropic's 400."""

from __future__ import annotations

import anthropic  # the test extra installs it: a missing package fails, never skips
import openai
import pytest
from pydantic import BaseModel

GREEDY = {"temperature": 0}  # the SDK has no temperature argument any more; the API field still exists
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
          "required": ["city", "country"], "additionalProperties": False}


class Capital(BaseModel):
    city: str
    country: str


@pytest.fixture(scope="module")
def claude(served):
    return anthropic.Anthropic(base_url=served.url, api_key="unused")


def test_messages_parse_reads_the_constrained_answer_into_the_callers_type(claude):
    message = claude.messages.parse(model="m", max_tokens=100, messages=QUESTION, output_format=Capital,
                                    extra_body=GREEDY)
    assert message.stop_reason == "end_turn" and [block.type for block in message.content] == ["text"]
    parsed = message.content[0].parsed_output
    assert isinstance(parsed, Capital) and parsed == Capital.model_validate_json(message.content[0].text)
    assert message.parsed_output == parsed


def test_a_json_schema_format_constrains_as_the_openai_route_does_streamed_or_not(claude, served):
    output_config = {"format": {"type": "json_schema", "schema": SCHEMA}}
    message = claude.messages.create(model="m", max_tokens=100, messages=QUESTION, output_config=output_config,
                                     extra_body=GREEDY)
    gpt = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    reply = gpt.chat.completions.create(model="m", messages=QUESTION, max_tokens=100, temperature=0,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "capital", "schema": SCHEMA}})
    assert message.content[0].text == reply.choices[0].message.content
    Capital.model_validate_json(message.content[0].text)
    with claude.messages.stream(model="m", max_tokens=100, messages=QUESTION, output_config=output_config,
                                extra_body=GREEDY) as stream:
        assert "".join(stream.text_stream) == message.content[0].text


def test_effort_is_accepted_and_changes_nothing(claude):
    plain = claude.messages.create(model="m", max_tokens=12, messages=QUESTION, extra_body=GREEDY)
    for effort in ("low", "max"):
        with_effort = claude.messages.create(model="m", max_tokens=12, messages=QUESTION, extra_body=GREEDY,
                                             output_config={"effort": effort})
        assert with_effort.content[0].text == plain.content[0].text


@pytest.mark.parametrize("output_config, words", [
    ({"effort": "extreme"}, "output_config.effort"),
    ({"format": {"type": "json_object"}}, "output_config.format"),
    ({"format": {"type": "json_schema", "schema": "object"}}, "output_config.format"),
    ({"verbosity": "low"}, "output_config"),
])
def test_a_malformed_output_config_is_anthropics_400(claude, output_config, words):
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="m", max_tokens=4, messages=QUESTION, output_config=output_config)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert caught.value.body["error"]["message"].startswith(words)
