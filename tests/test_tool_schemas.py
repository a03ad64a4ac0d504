"""Tool parameters as frameworks write them: pydantic's nested models put their parts in ``$defs`` and
point at them with ``#/$defs/...``, relative to the parameters (as llama.cpp resolves each tool's
references). Every route and the frameworks' default paths (instructor's tool mode) call such tools
with arguments their schema accepts; a tool without ``parameters`` takes none (OpenAI: "an empty
parameter list"). The prompt, and the "auto" answer, equal llama-server's."""

from __future__ import annotations

import json

import anthropic
import instructor
import jsonschema
import ollama
import openai
import pytest
from inprocess_server import serving
from pydantic import BaseModel

import mullama
from mullama.server import ServerSettings


class Person(BaseModel):
    name: str
    age: int


class Team(BaseModel):
    name: str
    members: list[Person]
    lead: Person | None = None


SCHEMA = Team.model_json_schema()  # {"$defs": {"Person": ...}, "properties": {"members": {"items": {"$ref": ...}}}}
TEAM = {"type": "function", "function": {"name": "make_team", "description": "Record a team",
                                         "parameters": SCHEMA}}
PING = {"type": "function", "function": {"name": "ping", "description": "Check the service is up"}}
QUESTION = [{"role": "user", "content": "Make a team called Blue with Ann, 31, and Bob, 45."}]


@pytest.fixture(scope="module")
def qwen_served(qwen_template, model_path):
    with mullama.Model.load(model_path, chat_template=qwen_template) as loaded, \
            serving(loaded, settings=ServerSettings(model_name="smollm2-qwen-template"), parallel=2,
                    n_ctx=4096) as (server, _engine):
        yield server


def test_the_schema_has_references_to_its_defs():
    assert "$defs" in SCHEMA and json.dumps(SCHEMA).count('"$ref": "#/$defs/Person"') == 2


def test_every_route_calls_a_tool_whose_parameters_refer_to_their_defs(qwen_served):
    chat = openai.OpenAI(base_url=f"{qwen_served.url}/v1", api_key="unused")
    reply = chat.chat.completions.create(model="m", messages=QUESTION, tools=[TEAM, PING], tool_choice="required",
                                         temperature=0, max_tokens=300)
    calls = reply.choices[0].message.tool_calls
    assert calls and reply.choices[0].finish_reason == "tool_calls"
    for call in calls:  # under the one grammar of both tools' schemas (the Team's at #/anyOf/0/...)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA if call.function.name == "make_team"
                            else {"type": "object", "properties": {}, "additionalProperties": False})

    claude = anthropic.Anthropic(base_url=qwen_served.url, api_key="unused")
    message = claude.messages.create(model="m", max_tokens=400, messages=QUESTION, tool_choice={"type": "any"},
                                     tools=[{"name": "make_team", "description": "Record a team",
                                             "input_schema": SCHEMA}])
    uses = [block for block in message.content if block.type == "tool_use"]
    assert uses  # complete calls only (one cut by max_tokens is left out)
    for use in uses:
        jsonschema.validate(use.input, SCHEMA)

    local = ollama.Client(host=qwen_served.url)
    answer = local.chat(model="m", messages=QUESTION, tools=[TEAM], options={"temperature": 0, "num_predict": 160})
    for tool_call in answer.message.tool_calls or []:  # ollama's tools are "auto": the model may answer in text
        jsonschema.validate(dict(tool_call.function.arguments), SCHEMA)


def test_instructors_default_tool_mode_fills_a_nested_model(qwen_served):
    client = instructor.from_openai(openai.OpenAI(base_url=f"{qwen_served.url}/v1", api_key="unused"))
    team = client.chat.completions.create(model="m", response_model=Team, messages=QUESTION, temperature=0,
                                          max_tokens=200, max_retries=0)
    assert isinstance(team, Team) and all(isinstance(member, Person) for member in team.members)


def test_a_tool_without_parameters_is_called_with_none(qwen_served):
    chat = openai.OpenAI(base_url=f"{qwen_served.url}/v1", api_key="unused")
    reply = chat.chat.completions.create(model="m", messages=[{"role": "user", "content": "Is it up?"}],
                                         tools=[PING], tool_choice="required", parallel_tool_calls=False,
                                         temperature=0, max_tokens=40)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "ping" and json.loads(call.function.arguments) == {}
    assert reply.choices[0].finish_reason == "tool_calls"


def test_the_prompt_and_the_auto_answer_equal_llama_servers(qwen_served, qwen_server):
    request = {"messages": QUESTION, "tools": [TEAM, PING], "max_tokens": 60, "temperature": 0}
    theirs = qwen_server.post("/v1/chat/completions", {**request, "cache_prompt": False})
    ours = openai.OpenAI(base_url=f"{qwen_served.url}/v1", api_key="unused").chat.completions.create(
        model="m", **request, extra_body={"cache_prompt": False})  # both decode the whole prompt in one batch
    assert ours.usage.prompt_tokens == theirs["usage"]["prompt_tokens"]
    message = theirs["choices"][0]["message"]
    assert (ours.choices[0].message.content or "") == (message.get("content") or "")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in ours.choices[0].message.tool_calls or []] \
        == [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []]
