"""The default paths of the agent frameworks users point at ``mullama serve``, on the default model
(SmolLM2, whose template has no tools section: the generic tool-call path), with the official
clients against the real server: forced tool calls always come back as calls, so structured output
through tools returns the model object; tools given under "auto" reach the prompt."""

from __future__ import annotations

import json
import os

import anthropic
import httpx
import instructor
import openai
import pytest
from langchain_anthropic import ChatAnthropic
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


class Person(BaseModel):
    name: str
    age: int


class City(BaseModel):
    """A city and the country it is in."""

    city: str
    country: str


class Weather(BaseModel):
    location: str
    temperature_celsius: float
    sunny: bool


class Book(BaseModel):
    title: str
    author: str
    year: int = Field(description="the year it was published")


class Pet(BaseModel):
    """An animal someone keeps at home."""

    species: str
    name: str
    age_years: int


# Five models and prompts that do not mention the tool (its name is the class name).
CASES = [(Person, "Invent a person: name and age."),
         (City, "Tell me about a famous place."),
         (Weather, "How is it outside in Madrid today?"),
         (Book, "Recommend something to read."),
         (Pet, "I want a companion at home.")]


def chat_body(**fields) -> dict:
    return {"model": "smollm2:135m", "max_tokens": 120, "temperature": 0, **fields}


def person_tool(name: str = "Person") -> dict:
    return {"type": "function", "function": {"name": name, "parameters": Person.model_json_schema()}}


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "Person"}}])
def test_a_forced_call_is_a_call_whatever_the_prompt(served, tool_choice):
    """The issue's reproduction: the call used to come back as JSON text with finish_reason stop."""
    body = chat_body(max_tokens=60, tool_choice=tool_choice, tools=[person_tool()],
                     messages=[{"role": "user", "content": "Invent a person: name and age."}])
    reply = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=300).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "Person"
    Person.model_validate_json(call["function"]["arguments"])

    # Streamed: the same call in delta.tool_calls, no content.
    pieces, content, finish = [], [], None
    with httpx.stream("POST", served.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for delta_choice in json.loads(line[6:])["choices"]:
                delta = delta_choice["delta"]
                pieces += delta.get("tool_calls") or []
                content.append(delta.get("content") or "")
                finish = delta_choice["finish_reason"] or finish
    assert finish == "tool_calls" and "".join(content) == ""
    assert pieces[0]["function"]["name"] == "Person" and pieces[0]["id"].startswith("call_")
    assert "".join(piece["function"]["arguments"] for piece in pieces) == call["function"]["arguments"]


def test_tools_under_auto_reach_the_prompt(served):
    """A template without a tools section still tells the model about its tools: more prompt tokens,
    counted by Anthropic's count_tokens too."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}
    without = httpx.post(served.url + "/v1/chat/completions", json=chat_body(max_tokens=1, messages=messages),
                         timeout=300).json()["usage"]["prompt_tokens"]
    with_tools = httpx.post(served.url + "/v1/chat/completions",
                            json=chat_body(max_tokens=1, messages=messages, tools=[weather]),
                            timeout=300).json()["usage"]["prompt_tokens"]
    assert with_tools > without + 20

    claude = anthropic.Anthropic(base_url=served.url, api_key="unused")
    tool = {"name": "get_weather", "description": "Current weather",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    plain = claude.messages.count_tokens(model="m", messages=messages).input_tokens
    counted = claude.messages.count_tokens(model="m", messages=messages, tools=[tool]).input_tokens
    assert counted > plain + 20


def test_an_auto_answer_that_opens_a_call_is_a_call(served):
    """Under "auto", an answer that starts with "{" is held to a call by the grammar and parsed."""
    body = chat_body(tools=[person_tool()], messages=[
        {"role": "system", "content": "You only ever answer by calling a tool."},
        {"role": "user", "content": "Invent a person: name and age."}])
    reply = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=300).json()
    choice = reply["choices"][0]
    if choice["message"].get("tool_calls"):
        assert choice["finish_reason"] == "tool_calls"
        Person.model_validate_json(choice["message"]["tool_calls"][0]["function"]["arguments"])
    else:  # text: it never opened with "{"
        assert not choice["message"]["content"].lstrip().startswith("{")


@pytest.mark.parametrize(("schema", "prompt"), CASES, ids=[case[0].__name__ for case in CASES])
def test_langchain_structured_output_through_tools(served, schema, prompt):
    """LangChain's with_structured_output(method="function_calling"), with ChatOpenAI and ChatAnthropic."""
    gpt = ChatOpenAI(base_url=f"{served.url}/v1", api_key="unused", model="smollm2:135m", temperature=0,
                     max_tokens=150)
    result = gpt.with_structured_output(schema, method="function_calling").invoke(prompt)
    assert isinstance(result, schema)
    claude = ChatAnthropic(base_url=served.url, api_key="unused", model="smollm2:135m", temperature=0,
                           max_tokens=150)
    result = claude.with_structured_output(schema, method="function_calling").invoke(prompt)
    assert isinstance(result, schema)


def test_instructor_tools_mode(served):
    client = instructor.from_openai(openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused"),
                                    mode=instructor.Mode.TOOLS)
    for schema, prompt in CASES[:3]:
        result = client.chat.completions.create(model="smollm2:135m", response_model=schema, temperature=0,
                                                max_tokens=150, max_retries=0,
                                                messages=[{"role": "user", "content": prompt}])
        assert isinstance(result, schema)


def test_pydantic_ai_agent_with_an_output_type(served):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("smollm2:135m", provider=OpenAIProvider(base_url=f"{served.url}/v1", api_key="unused"))
    agent = Agent(model, output_type=Person, model_settings={"temperature": 0, "max_tokens": 150})
    result = agent.run_sync("Invent a person: name and age.")
    assert isinstance(result.output, Person)
