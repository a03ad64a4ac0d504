"""Anthropic's Messages API on the real server and model, driven by the official `anthropic` SDK:
answers equal the OpenAI route's for the same conversation, streamed and not; tools; errors in
Anthropic's shape."""

from __future__ import annotations

import json

import anthropic  # the test extra installs it: a missing package fails, never skips
import httpx
import openai
import pytest
from inprocess_server import serving
from upstream import template_path

import mullama
from mullama.server import ServerSettings

# The SDK has no temperature argument any more (its newest models fix it); the API field still exists.
GREEDY = {"temperature": 0}
CONVERSATION = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]}]


@pytest.fixture(scope="module")
def clients(served):
    return (anthropic.Anthropic(base_url=served.url, api_key="unused"),
            openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused"))


def openai_answer(client, system: str | None, messages: list[dict], **options) -> tuple[str, str]:
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "\n".join(b["text"] for b in m["content"])} for m in messages]
    reply = client.chat.completions.create(model="m", messages=([{"role": "system", "content": system}]
                                                                if system else []) + flat, **options)
    return reply.choices[0].message.content, reply.choices[0].finish_reason


def test_messages_equal_the_openai_route_streamed_and_not(clients):
    claude, gpt = clients
    message = claude.messages.create(model="smollm2:135m", max_tokens=24, extra_body=GREEDY,
                                     system="Answer in one word.", messages=CONVERSATION)
    expected, finish = openai_answer(gpt, "Answer in one word.", CONVERSATION, max_tokens=24, temperature=0)
    assert message.type == "message" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == expected
    assert message.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[finish]
    assert message.usage.output_tokens > 0 and message.usage.input_tokens + message.usage.cache_read_input_tokens > 10
    with claude.messages.stream(model="smollm2:135m", max_tokens=24, extra_body=GREEDY, system="Answer in one word.",
                                messages=CONVERSATION) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == expected == final.content[0].text
    assert final.stop_reason == message.stop_reason and final.usage.output_tokens == message.usage.output_tokens


def test_stop_sequences_and_max_tokens(clients):
    claude, _ = clients
    counted = claude.messages.create(model="m", max_tokens=40, extra_body=GREEDY,
                                     messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
    text = counted.content[0].text
    stop = next(part for part in (", 5", ",5", "5") if part in text)
    stopped = claude.messages.create(model="m", max_tokens=40, extra_body=GREEDY, stop_sequences=[stop],
                                     messages=[{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stopped.content[0].text == text[: text.index(stop)]
    short = claude.messages.create(model="m", max_tokens=3, messages=[{"role": "user", "content": "Tell a story."}])
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


def test_count_tokens_equals_the_prompt(clients, model):
    claude, _ = clients
    counted = claude.messages.count_tokens(model="m", system="Be brief.", messages=CONVERSATION)
    flat = [{"role": "system", "content": "Be brief."}, CONVERSATION[0], CONVERSATION[1],
            {"role": "user", "content": "And of Italy?"}]
    prompt = model.tokenize(model.apply_chat_template(flat), add_special=True, parse_special=True)
    assert counted.input_tokens == len(prompt)


def test_tools_over_the_messages_api(build, model_path):
    template = template_path(build, "Qwen-Qwen2.5-7B-Instruct.jinja")
    with mullama.Model.load(model_path, chat_template=template) as qwen, \
            serving(qwen, settings=ServerSettings(model_name="m"), parallel=1, n_ctx=2048) as (server, _engine):
        claude = anthropic.Anthropic(base_url=server.url, api_key="unused")
        tools = [{"name": "get_weather", "description": "The weather in a city", "input_schema": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
        question = [{"role": "user", "content": "What is the weather in Paris?"}]
        called = claude.messages.create(model="m", max_tokens=100, extra_body=GREEDY, tools=tools,
                                        tool_choice={"type": "tool", "name": "get_weather"}, messages=question)
        assert called.stop_reason == "tool_use"
        (use,) = [block for block in called.content if block.type == "tool_use"]
        assert use.name == "get_weather" and isinstance(use.input["city"], str)
        with claude.messages.stream(model="m", max_tokens=100, extra_body=GREEDY, tools=tools,
                                    tool_choice={"type": "any", "disable_parallel_tool_use": True},
                                    messages=question) as stream:
            final = stream.get_final_message()
        (streamed,) = [block for block in final.content if block.type == "tool_use"]
        assert streamed.name == "get_weather" and streamed.input == use.input
        history = [*question, {"role": "assistant", "content": called.content},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                 "content": "18 degrees celsius, sunny"}]}]
        answer = claude.messages.create(model="m", max_tokens=30, extra_body=GREEDY, tools=tools, messages=history)
        assert answer.content and answer.content[0].type == "text" and answer.content[0].text


@pytest.mark.parametrize("body, status", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400),  # no max_tokens
    ({"max_tokens": 8, "messages": []}, 400),
    ({"max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, 400),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, 400),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "temperature": 2}, 400),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, 400),  # (above the limit: capped)
    # a tool_result answers a tool_use of the message before it, as Anthropic checks
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}]}, 400),
    ({"max_tokens": 8, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "sunny"}]}]}, 400),
])
def test_bad_requests_get_anthropic_errors(served, body, status):
    response = httpx.post(f"{served.url}/v1/messages", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error" and error["error"]["message"]


def test_the_sdk_raises_its_own_error_types(clients):
    claude, _ = clients
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="m", max_tokens=8, messages=[])
    assert "messages" in json.dumps(caught.value.body)


@pytest.mark.parametrize("thinking, max_tokens, needle", [
    ({"type": "enabled", "budget_tokens": -5}, 2048, "budget_tokens"),
    ({"type": "enabled", "budget_tokens": "lots"}, 2048, "budget_tokens"),
    ({"type": "enabled", "budget_tokens": 1024.5}, 2048, "budget_tokens"),
    ({"type": "enabled"}, 2048, "budget_tokens"),
    ({"type": "enabled", "budget_tokens": 512}, 2048, "1024"),  # Anthropic's least budget
    ({"type": "enabled", "budget_tokens": 2048}, 2048, "max_tokens"),  # must stay below max_tokens
    ({"type": "pondering"}, 16, "thinking"),
    ({"budget_tokens": 2048}, 16, "thinking"),
    ({"type": "adaptive", "display": "loud"}, 16, "display"),
])
def test_a_bad_thinking_setting_is_refused_as_anthropic_refuses_it(clients, thinking, max_tokens, needle):
    claude, _ = clients
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="m", max_tokens=max_tokens, thinking=thinking,
                               messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 400
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "invalid_request_error"
    assert needle in caught.value.body["error"]["message"]


def test_a_text_thinking_setting_is_refused(served):
    """Not an object at all (the SDK's types would not let it through): raw HTTP."""
    for thinking in ("yes", 4096, ["enabled"]):
        response = httpx.post(f"{served.url}/v1/messages", timeout=60, json={
            "model": "m", "max_tokens": 16, "thinking": thinking, "messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "invalid_request_error"


def test_valid_thinking_settings_are_accepted_and_change_nothing(clients):
    """A local model thinks as its chat template says: the setting is checked, then has no effect."""
    claude, _ = clients
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = claude.messages.create(model="m", max_tokens=16, extra_body=GREEDY, system="Answer in one word.",
                                   messages=messages)
    assert plain.stop_reason == "end_turn"  # a short answer: the 1025 max_tokens below are not all spent
    for thinking in ({"type": "disabled"}, {"type": "adaptive"}, {"type": "adaptive", "display": "omitted"},
                     {"type": "between_tools"}):
        reply = claude.messages.create(model="m", max_tokens=16, extra_body=GREEDY, thinking=thinking,
                                       system="Answer in one word.", messages=messages)
        assert reply.content[0].text == plain.content[0].text
    enabled = claude.messages.create(model="m", max_tokens=1025, extra_body=GREEDY, system="Answer in one word.",
                                     messages=messages, thinking={"type": "enabled", "budget_tokens": 1024})
    assert enabled.content[0].text == plain.content[0].text


@pytest.mark.parametrize("tool_input", ["{\"city\": \"Paris\"}", None, ["Paris"], 5])
def test_a_tool_use_input_that_is_not_an_object_is_refused(clients, tool_input):
    claude, _ = clients
    block = {"type": "tool_use", "id": "toolu_1", "name": "get_weather"}
    if tool_input is not None:
        block["input"] = tool_input
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model="m", max_tokens=16, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [block]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}])
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert "messages.1.content.0.tool_use.input" in caught.value.body["error"]["message"]
