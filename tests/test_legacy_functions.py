"""OpenAI's deprecated function calling (``functions``, ``function_call``, ``role: "function"``) on the
default model, with the openai SDK and LangChain's legacy path against the real server: the same
generation as the tools form, written back as ``function_call``."""

from __future__ import annotations

import httpx
import openai
import pytest
from langchain_core.output_parsers.openai_functions import JsonOutputFunctionsParser
from langchain_openai import ChatOpenAI
from pydantic import BaseModel


class Person(BaseModel):
    name: str
    age: int


FUNCTION = {"name": "Person", "description": "A person", "parameters": Person.model_json_schema()}
ASK = [{"role": "user", "content": "Invent a person: name and age."}]


def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)


def post(served, **body) -> httpx.Response:
    return httpx.post(served.url + "/v1/chat/completions", timeout=300,
                      json={"model": "m", "max_tokens": 60, "temperature": 0, **body})


def test_a_named_function_call_comes_back_as_function_call(served):
    reply = client(served).chat.completions.create(model="m", messages=ASK, functions=[FUNCTION],
                                                   function_call={"name": "Person"}, max_tokens=60, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call"
    assert choice.message.tool_calls is None and choice.message.content is None
    assert choice.message.function_call.name == "Person"
    Person.model_validate_json(choice.message.function_call.arguments)

    # The same generation as the tools form with that function forced, one call.
    tools = post(served, messages=ASK, tools=[{"type": "function", "function": FUNCTION}],
                 tool_choice={"type": "function", "function": {"name": "Person"}}, parallel_tool_calls=False).json()
    assert tools["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == \
        choice.message.function_call.arguments
    assert tools["usage"]["prompt_tokens"] == reply.usage.prompt_tokens

    # Streamed: delta.function_call, the name first, then the arguments in pieces.
    names, arguments, finish = [], [], None
    for chunk in client(served).chat.completions.create(model="m", messages=ASK, functions=[FUNCTION],
                                                        function_call={"name": "Person"}, max_tokens=60,
                                                        temperature=0, stream=True):
        for streamed in chunk.choices:
            assert streamed.delta.tool_calls is None
            if streamed.delta.function_call is not None:
                names.append(streamed.delta.function_call.name)
                arguments.append(streamed.delta.function_call.arguments or "")
            finish = streamed.finish_reason or finish
    assert names[0] == "Person" and not any(names[1:]) and finish == "function_call"
    assert "".join(arguments) == choice.message.function_call.arguments


def test_langchain_legacy_functions_parser(served):
    """LangChain's pre-tools path: bind(functions=..., function_call=...) and JsonOutputFunctionsParser."""
    chat = ChatOpenAI(base_url=served.url + "/v1", api_key="unused", model="m", temperature=0, max_tokens=60)
    chain = chat.bind(functions=[FUNCTION], function_call={"name": "Person"}) | JsonOutputFunctionsParser()
    Person.model_validate(chain.invoke("Invent a person: name and age."))


def test_function_call_none_and_auto(served):
    none = post(served, messages=ASK, functions=[FUNCTION], function_call="none", max_tokens=16).json()
    plain = post(served, messages=ASK, max_tokens=16).json()
    assert none["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert "function_call" not in none["choices"][0]["message"]
    assert none["choices"][0]["finish_reason"] == "length"

    auto = post(served, messages=ASK, functions=[FUNCTION], max_tokens=16).json()
    tools_auto = post(served, messages=ASK, tools=[{"type": "function", "function": FUNCTION}],
                      parallel_tool_calls=False, max_tokens=16).json()
    assert auto["usage"]["prompt_tokens"] == tools_auto["usage"]["prompt_tokens"]
    assert auto["choices"][0]["message"]["content"] == tools_auto["choices"][0]["message"]["content"]


def test_a_legacy_history_is_the_tools_history(served):
    """An assistant function_call and the function's result render as a tool call and its result."""
    legacy = [*ASK, {"role": "assistant", "content": None,
                     "function_call": {"name": "Person", "arguments": '{"name": "Ann", "age": 31}'}},
              {"role": "function", "name": "Person", "content": "saved"}]
    call = {"name": "Person", "arguments": '{"name": "Ann", "age": 31}'}
    tools = [*ASK, {"role": "assistant", "content": None,
                    "tool_calls": [{"id": "call_1", "type": "function", "function": call}]},
             {"role": "tool", "tool_call_id": "call_1", "name": "Person", "content": "saved"}]
    one = post(served, messages=legacy, functions=[FUNCTION], max_tokens=24).json()
    other = post(served, messages=tools, tools=[{"type": "function", "function": FUNCTION}],
                 parallel_tool_calls=False, max_tokens=24).json()
    assert one["usage"]["prompt_tokens"] == other["usage"]["prompt_tokens"]
    assert one["choices"][0]["message"]["content"] == other["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"functions": [FUNCTION], "tools": [{"type": "function", "function": FUNCTION}]}, "functions", "not both"),
    ({"function_call": "auto"}, "functions", "needs 'functions'"),
    ({"functions": []}, "functions", "non-empty list"),
    ({"functions": [{"description": "no name"}]}, "functions", "'name' string"),
    ({"functions": [FUNCTION], "function_call": {"name": "Person", "x": 1}}, "function_call", "my_function"),
    ({"functions": [FUNCTION], "function_call": {"name": "Nobody"}}, None, "Nobody"),
])
def test_mistakes_are_clear_400s(served, body, param, words):
    response = post(served, messages=ASK, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param


def test_completions_do_not_take_functions(served):
    response = httpx.post(served.url + "/v1/completions", timeout=300,
                          json={"model": "m", "prompt": "Hi", "functions": [FUNCTION]})
    assert response.status_code == 400 and "functions" in response.json()["error"]["message"]
