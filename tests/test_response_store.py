"""The Responses API's conversation state on the real server, with the openai SDK and openai-agents:
``previous_response_id`` continues a stored response exactly as the whole conversation sent again
would (the earlier instructions not carried over, as OpenAI's), ``store: false`` keeps nothing,
``responses.retrieve`` and ``responses.delete`` read and forget one, ``responses.input_items.list`` lists
its input and an ``item_reference`` names one of its items."""

from __future__ import annotations

import asyncio

import agents  # the test extra installs these: a missing package fails, never skips
import openai
import pytest

from mullama.server._response_store import ResponseStore

# Whole prompts, never a cached prefix: a prompt decoded after a cached prefix can part from the same prompt
# decoded whole at a near-tie (batch shapes), and these tests compare answers of the same conversation.
GREEDY = {"temperature": 0, "extra_body": {"cache_prompt": False}}
WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def test_a_continued_response_is_the_whole_conversation_sent_again(client):
    first = client.responses.create(model="m", instructions="Answer in one short sentence.",
                                    input="My name is Ann. Greet me.", max_output_tokens=24, **GREEDY)
    assert first.store is True and first.previous_response_id is None
    second = client.responses.create(model="m", previous_response_id=first.id, input="What is my name?",
                                     max_output_tokens=24, **GREEDY)
    assert second.previous_response_id == first.id and second.output_text
    again = client.responses.create(model="m", max_output_tokens=24, **GREEDY, input=[
        {"role": "user", "content": "My name is Ann. Greet me."},
        {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": "What is my name?"}])
    assert second.output_text == again.output_text
    assert second.usage.input_tokens == again.usage.input_tokens
    counted = client.responses.input_tokens.count(model="m", previous_response_id=first.id, input="What is my name?")
    assert counted.input_tokens == second.usage.input_tokens

    # A third turn continues the second, streamed: the stored chain grows, and the streamed answer is stored too.
    (streamed,) = [event.response for event in client.responses.create(
        model="m", previous_response_id=second.id, input="Spell it.", max_output_tokens=16, stream=True, **GREEDY)
        if event.type in ("response.completed", "response.incomplete")]
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    third = client.responses.create(model="m", previous_response_id=second.id, input="Spell it.",
                                    max_output_tokens=16, **GREEDY)
    assert third.output_text == streamed.output_text
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens


def test_retrieve_delete_and_store_false(client):
    kept = client.responses.create(model="m", input="Say hi.", max_output_tokens=8, **GREEDY)
    assert client.responses.retrieve(kept.id).model_dump() == kept.model_dump()
    with pytest.raises(openai.BadRequestError) as refused:  # not an empty stream: the SDK would read no events
        client.responses.retrieve(kept.id, stream=True)
    assert refused.value.body["param"] == "stream"
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="m", previous_response_id=kept.id, input="Again.", max_output_tokens=4)
    assert caught.value.code == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(kept.id)

    unkept = client.responses.create(model="m", input="Say hi.", max_output_tokens=8, store=False, **GREEDY)
    assert unkept.store is False and unkept.output_text == kept.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_a_tool_result_continues_the_response_that_called(client):
    """OpenAI's tool loop with stored state: the call's response, then only the function_call_output."""
    called = client.responses.create(model="m", input="What is the weather in Paris?", tools=[WEATHER_TOOL],
                                     tool_choice="required", max_output_tokens=40, **GREEDY)
    (call,) = [item for item in called.output if item.type == "function_call"]
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 24 C"}
    answer = client.responses.create(model="m", previous_response_id=called.id, input=[result],
                                     tools=[WEATHER_TOOL], max_output_tokens=24, **GREEDY)
    again = client.responses.create(model="m", tools=[WEATHER_TOOL], max_output_tokens=24, **GREEDY, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}, result])
    assert answer.output_text == again.output_text
    assert answer.usage.input_tokens == again.usage.input_tokens

    # The call's own item, named by an item_reference (as clients that keep state by ids send it), is the item.
    referenced = client.responses.create(model="m", tools=[WEATHER_TOOL], max_output_tokens=24, **GREEDY, input=[
        {"role": "user", "content": "What is the weather in Paris?"}, {"type": "item_reference", "id": call.id},
        result])
    assert referenced.output_text == again.output_text
    listed = list(client.responses.input_items.list(answer.id, order="asc"))
    assert [item.type for item in listed] == ["message", "function_call", "function_call_output"]
    assert listed[1].id == call.id and listed[1].arguments == call.arguments and listed[2].output == "sunny, 24 C"
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="m", input=[{"type": "item_reference", "id": "fc_none"}], max_output_tokens=4)
    assert "fc_none" in str(caught.value) and caught.value.body["param"] == "input"


def test_input_items_list_what_the_model_saw(client):
    """``responses.input_items.list``: the input of a response, those of the responses it continues too, in
    OpenAI's item shapes (newest first by default), with ids that stay the same, a page at a time."""
    first = client.responses.create(model="m", instructions="Answer in one short sentence.",
                                    input="My name is Ann. Greet me.", max_output_tokens=8, **GREEDY)
    second = client.responses.create(model="m", previous_response_id=first.id, max_output_tokens=8, **GREEDY,
                                     input=[{"role": "user", "content": [{"type": "input_text", "text": "Who?"}]}])
    (user,) = client.responses.input_items.list(first.id)
    assert (user.type, user.role, user.content[0].type, user.content[0].text) == (
        "message", "user", "input_text", "My name is Ann. Greet me.")
    newest_first = list(client.responses.input_items.list(second.id))
    assert [item.id for item in newest_first][1:] == [first.output[-1].id, user.id]
    assert newest_first[0].content[0].text == "Who?" and newest_first[1].content[0].text == first.output_text
    paged = client.responses.input_items.list(second.id, order="asc", limit=1)
    assert paged.has_more and [item.id for item in paged.data] == [user.id]
    assert [item.id for item in paged] == [item.id for item in newest_first[::-1]]  # the SDK follows 'after'
    after = client.responses.input_items.list(second.id, after=user.id, order="asc")
    assert [item.id for item in after] == [item.id for item in newest_first[1::-1]] and not after.has_more

    for query, param in [({"limit": 0}, "limit"), ({"limit": "many"}, "limit"), ({"order": "sideways"}, "order"),
                         ({"after": "msg_none"}, "after")]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.responses.input_items.list(second.id, extra_query=query)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_none")
    unkept = client.responses.create(model="m", input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(unkept.id)


def test_openai_agents_continues_a_run_by_its_last_response_id(served, client):
    agents.set_tracing_disabled(True)
    model = agents.OpenAIResponsesModel(model="m", openai_client=openai.AsyncOpenAI(
        base_url=f"{served.url}/v1", api_key="unused"))
    agent = agents.Agent(name="helper", model=model, instructions="Answer in one short sentence.",
                         model_settings=agents.ModelSettings(temperature=0, max_tokens=200,
                                                             extra_body={"cache_prompt": False}))
    first = asyncio.run(agents.Runner.run(agent, "My name is Ann. Greet me."))
    assert first.last_response_id and client.responses.retrieve(first.last_response_id).output_text
    second = asyncio.run(agents.Runner.run(agent, "What is my name?", previous_response_id=first.last_response_id))
    expected = client.responses.create(model="m", previous_response_id=first.last_response_id,
                                       instructions="Answer in one short sentence.", input="What is my name?",
                                       max_output_tokens=200, **GREEDY)
    assert second.final_output == expected.output_text


def test_the_store_keeps_the_newest():
    store = ResponseStore(capacity=2)
    for number in range(3):
        store.keep({"id": f"resp_{number}"}, [], [])
    assert store.get("resp_0") is None and store.get("resp_1") is not None and store.get("resp_2") is not None
