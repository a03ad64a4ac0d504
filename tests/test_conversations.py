"""OpenAI's Conversations API on the real server, with the openai SDK and openai-agents: a response's
``conversation`` is that conversation's items then the new input (the same prompt and answer as the
whole conversation sent again) and grows it by the input and the answer; items are added, listed,
read and removed; openai-agents keeps a session there (``OpenAIConversationsSession``) or runs in one
(``conversation_id``)."""

from __future__ import annotations

import asyncio

import agents  # the test extra installs these: a missing package fails, never skips
import httpx
import openai
import pytest

# Whole prompts, never a cached prefix (see test_response_store).
GREEDY = {"temperature": 0, "extra_body": {"cache_prompt": False}}


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def test_a_response_in_a_conversation_continues_it_and_grows_it(client):
    conversation = client.conversations.create(metadata={"topic": "names"})
    assert conversation.object == "conversation" and conversation.metadata == {"topic": "names"}
    first = client.responses.create(model="m", conversation=conversation.id, input="My name is Ann. Greet me.",
                                    max_output_tokens=24, **GREEDY)
    assert first.conversation.id == conversation.id
    second = client.responses.create(model="m", conversation={"id": conversation.id}, input="What is my name?",
                                     max_output_tokens=24, **GREEDY)
    again = client.responses.create(model="m", max_output_tokens=24, **GREEDY, input=[
        {"role": "user", "content": "My name is Ann. Greet me."},
        {"role": "assistant", "content": [{"type": "output_text", "text": first.output_text}]},
        {"role": "user", "content": "What is my name?"}])
    assert second.output_text == again.output_text and second.usage.input_tokens == again.usage.input_tokens
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert [(item.type, item.role) for item in items] == [("message", "user"), ("message", "assistant")] * 2
    assert items[1].id == first.output[-1].id and items[3].content[0].text == second.output_text
    assert [item.id for item in client.conversations.items.list(conversation.id)] == [item.id for item in items[::-1]]
    counted = client.responses.input_tokens.count(model="m", conversation=conversation.id, input="Spell it.")
    assert counted.input_tokens > second.usage.input_tokens
    with pytest.raises(openai.BadRequestError, match="Mutually exclusive"):
        client.responses.create(model="m", conversation=conversation.id, previous_response_id=first.id, input="Hi")


def test_items_are_added_read_and_removed(client):
    conversation = client.conversations.create(items=[{"type": "message", "role": "user", "content": "Hello!"}])
    (hello,) = client.conversations.items.list(conversation.id)
    assert hello.type == "message" and hello.content[0].text == "Hello!" and hello.id.startswith("msg_")
    added = client.conversations.items.create(conversation.id, items=[
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}])
    assert [item.type for item in added.data] == ["function_call", "function_call_output"]
    assert client.conversations.items.retrieve(added.data[1].id, conversation_id=conversation.id).output == "sunny"
    assert client.conversations.items.delete(added.data[0].id, conversation_id=conversation.id).id == conversation.id
    assert [item.id for item in client.conversations.items.list(conversation.id, order="asc")] == [
        hello.id, added.data[1].id]
    assert client.conversations.update(conversation.id, metadata={"k": "v"}).metadata == {"k": "v"}
    assert client.conversations.retrieve(conversation.id).metadata == {"k": "v"}

    for items in ([{"role": "wizard", "content": "hi"}], [{"role": "user", "content": "hi"}] * 21, "hi"):
        with pytest.raises(openai.BadRequestError) as refused:
            client.conversations.items.create(conversation.id, items=items)
        assert refused.value.body["param"] == "items"
    with pytest.raises(openai.BadRequestError) as refused:
        client.conversations.create(metadata={"k": 5})
    assert refused.value.body["param"] == "metadata"
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve("msg_none", conversation_id=conversation.id)

    assert client.conversations.delete(conversation.id).deleted is True
    for gone in (lambda: client.conversations.retrieve(conversation.id),
                 lambda: client.conversations.items.list(conversation.id),
                 lambda: client.responses.create(model="m", conversation=conversation.id, input="Hi")):
        with pytest.raises(openai.NotFoundError):
            gone()


def test_one_response_at_a_time_in_a_conversation(served, client):
    """While a response is being made in a conversation, another is OpenAI's 400 ``conversation_locked`` (it
    would not see the first one's turn); once it is made, the next goes on from it."""
    conversation = client.conversations.create()
    body = {"model": "m", "conversation": conversation.id, "input": "Count to twenty.", "max_output_tokens": 24,
            "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/responses", json=body, timeout=120) as streaming:
        lines = streaming.iter_lines()
        assert next(line for line in lines if line.startswith("data: ")).find("response.created") > 0
        with pytest.raises(openai.BadRequestError) as locked:
            client.responses.create(model="m", conversation=conversation.id, input="Hi", max_output_tokens=2)
        assert locked.value.code == "conversation_locked" and locked.value.body["param"] == "conversation"
        rest = list(lines)  # to the end of the body: the server's stream is over, its claim released
        assert any("response.completed" in line or "response.incomplete" in line for line in rest)
    after = client.responses.create(model="m", conversation=conversation.id, input="Hi", max_output_tokens=2)
    assert after.conversation.id == conversation.id
    assert len(list(client.conversations.items.list(conversation.id))) == 4


def test_item_ids_are_strings_and_never_repeat_in_a_list(client):
    """An id the client gives must be a string; one a list already has is OpenAI's 400 "Duplicate item
    found" (a list pages by ids), and a bad reference is a 400 too, never a server error."""
    first = client.responses.create(model="m", input="Say hi.", max_output_tokens=4)
    for item in ({"type": "message", "role": "user", "content": "hi", "id": ["x"]},
                 {"type": "item_reference", "id": ["x"]}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(model="m", input=[item], max_output_tokens=2)
        assert refused.value.body["param"] == "input"
    output = {"type": "item_reference", "id": first.output[-1].id}
    with pytest.raises(openai.BadRequestError, match="Duplicate item found"):
        client.responses.create(model="m", previous_response_id=first.id, input=[output], max_output_tokens=2)
    assert client.responses.create(model="m", input=[output, {"role": "user", "content": "Again."}],
                                   max_output_tokens=2).status in ("completed", "incomplete")
    conversation = client.conversations.create(items=[{"role": "user", "content": "Hello!"}])
    (hello,) = client.conversations.items.list(conversation.id)
    with pytest.raises(openai.BadRequestError, match="Duplicate item found") as refused:
        client.conversations.items.create(conversation.id, items=[hello.model_dump(exclude_none=True)])
    assert refused.value.body["param"] == "items"
    with pytest.raises(openai.BadRequestError) as refused:
        client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "x", "id": 7}])
    assert refused.value.body["param"] == "items"
    assert len(list(client.conversations.items.list(conversation.id))) == 1


def test_openai_agents_keeps_a_session_and_runs_in_a_conversation(served, client):
    """openai-agents' ``OpenAIConversationsSession`` (it adds and lists the items itself) and
    ``Runner.run(..., conversation_id=...)`` (the Responses API's ``conversation``)."""
    agents.set_tracing_disabled(True)
    conversation = client.conversations.create()

    async def runs() -> tuple[list, agents.RunResult, agents.RunResult]:
        # One event loop for the client's connections: a pooled connection of a closed loop fails after the
        # request went out, and the SDK's retry would send it again.
        async_client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused")
        agent = agents.Agent(name="helper", instructions="Answer in one short sentence.",
                             model=agents.OpenAIResponsesModel(model="m", openai_client=async_client),
                             model_settings=agents.ModelSettings(temperature=0, max_tokens=40,
                                                                 extra_body={"cache_prompt": False}))
        session = agents.OpenAIConversationsSession(openai_client=async_client)
        await agents.Runner.run(agent, "My name is Ann. Greet me.", session=session)
        await agents.Runner.run(agent, "What is my name?", session=session)
        first = await agents.Runner.run(agent, "My name is Ann. Greet me.", conversation_id=conversation.id)
        second = await agents.Runner.run(agent, "What is my name?", conversation_id=conversation.id)
        return await session.get_items(), first, second

    items, first, second = asyncio.run(runs())
    assert [item.get("role") for item in items] == ["user", "assistant", "user", "assistant"]
    expected = client.responses.create(model="m", instructions="Answer in one short sentence.", max_output_tokens=40,
                                       **GREEDY, input=[
                                           {"role": "user", "content": "My name is Ann. Greet me."},
                                           {"role": "assistant", "content": [
                                               {"type": "output_text", "text": first.final_output}]},
                                           {"role": "user", "content": "What is my name?"}])
    assert second.final_output == expected.output_text
    assert len(list(client.conversations.items.list(conversation.id))) == 4
