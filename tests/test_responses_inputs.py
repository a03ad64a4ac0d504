"""What /v1/responses makes of its inputs, on the real server and model, compared with the chat
route's answer to the same conversation and with llama-server's own /v1/responses: function tools
become the chat tools llama-server's converter makes (the same prompt and greedy answer, ``strict``
and ``description`` given or not), and ``input_image`` parts become chat's ``image_url`` parts
(test_vision_server compares them with llama-server --mmproj's answers)."""

from __future__ import annotations

import json

import httpx
import pytest

GREEDY = {"temperature": 0}
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}


def answer_of(output: list[dict]) -> list[tuple]:
    """A /v1/responses output (as JSON) as text and (name, arguments) calls, to compare."""
    return [("text", item["content"][0]["text"]) if item["type"] == "message"
            else ("call", item["name"], json.loads(item["arguments"]))
            for item in output if item["type"] != "reasoning"]


def chat_answer_of(message: dict) -> list[tuple]:
    """A /v1/chat/completions message (as JSON) as answer_of gives a response's output."""
    text = [("text", message["content"])] if message.get("content") else []
    return text + [("call", call["function"]["name"], json.loads(call["function"]["arguments"]))
                   for call in message.get("tool_calls") or []]


@pytest.mark.parametrize("strict", [None, True, False])
@pytest.mark.parametrize("description", ["The weather in a city", None])
def test_tools_give_the_chat_routes_prompt_and_answer(served, qwen_served, qwen_server, strict, description):
    """A function tool (with or without ``strict`` and ``description``) becomes the chat tool
    llama-server's converter makes (the tool without its type, strict true if not given): the prompt
    (its token count) and the greedy answer equal the chat route's for the same conversation and tool,
    and, with a template that writes the tools into the prompt (Qwen 2.5's), llama-server's
    /v1/responses and /v1/chat/completions'. (Prompt cache off: a prompt decoded whole and one decoded
    after a cached prefix may differ in their last digits, and so in a greedy answer.)"""
    function = {"name": "get_weather", **({"description": description} if description else {}),
                "parameters": PARAMETERS, **({"strict": strict} if strict is not None else {})}
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    responses = {"model": "m", "instructions": "Use the tools.", "input": question, "max_output_tokens": 40,
                 "tools": [{"type": "function", **function}], "cache_prompt": False, **GREEDY}
    chat = {"model": "m", "messages": [{"role": "system", "content": "Use the tools."}, *question], "max_tokens": 40,
            "tools": [{"type": "function", "function": function}], "cache_prompt": False, **GREEDY}
    answers = []
    for url in (served.url, qwen_served.url):
        ours = httpx.post(f"{url}/v1/responses", json=responses, timeout=300).json()
        reply = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=300).json()
        assert ours["usage"]["input_tokens"] == reply["usage"]["prompt_tokens"]
        assert answer_of(ours["output"]) == chat_answer_of(reply["choices"][0]["message"])
        answers.append((ours["usage"]["input_tokens"], answer_of(ours["output"])))
    theirs = qwen_server.post("/v1/responses", responses)
    their_chat = qwen_server.post("/v1/chat/completions", chat)
    assert theirs["usage"]["input_tokens"] == their_chat["usage"]["prompt_tokens"] == answers[1][0]
    assert answer_of(theirs["output"]) == chat_answer_of(their_chat["choices"][0]["message"]) == answers[1][1]


def test_an_image_to_a_text_only_model_is_the_chat_routes_refusal(served):
    """An input_image part becomes chat's image_url part (as llama-server converts it, in a message or
    a function_call_output): a model served without a projector refuses it as the chat route does."""
    image = "data:image/png;base64,iVBORw0KGgo="
    chat = httpx.post(f"{served.url}/v1/chat/completions", timeout=60, json={"max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": image}}]}]})
    for item in ({"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                              {"type": "input_image", "image_url": image, "detail": "auto"}]},
                 {"type": "function_call_output", "call_id": "call_1", "output": [
                     {"type": "input_text", "text": "The photo:"}, {"type": "input_image", "image_url": image}]}):
        response = httpx.post(f"{served.url}/v1/responses", json={"input": [item], "max_output_tokens": 2}, timeout=60)
        assert response.status_code == chat.status_code == 400
        error, expected = response.json()["error"], chat.json()["error"]
        assert error["message"] == expected["message"] and "text only" in error["message"]
        assert (error["code"], error["param"]) == (expected["code"], "input")
