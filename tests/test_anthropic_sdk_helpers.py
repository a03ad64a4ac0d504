"""What the `anthropic` SDK's helpers need from the Messages route, on the real server and model:
the beta tool runner (which asks for a message thread first, and goes on without one when the
server answers Anthropic's ``thread_unsupported_request``), and the usage of a prompt read from the
cache (``cache_read_input_tokens``, as llama-server reports it), streamed and not."""

from __future__ import annotations

import json

import anthropic  # the test extra installs it: a missing package fails, never skips
import httpx
import pytest
from anthropic import beta_tool

GREEDY = {"temperature": 0}  # the SDK has no temperature argument any more; the API field still exists
WEATHER = "18 degrees celsius, sunny"


def test_the_beta_tool_runner_goes_on_without_a_thread_and_calls_the_tool(served):
    """The runner's first request carries ``thread`` (message threads, kept by the server): refused with
    the error details the SDK recovers from; it sends the turn again without ``thread``, the forced
    tool choice makes the model call the tool, the runner runs it and sends its result back."""
    exchanges: list[tuple[dict, int, dict]] = []

    def record(response) -> None:
        response.read()
        exchanges.append((json.loads(response.request.content), response.status_code, response.json()))

    http = anthropic.DefaultHttpxClient(event_hooks={"response": [record]})
    claude = anthropic.Anthropic(base_url=served.url, api_key="unused", http_client=http)
    asked: list[str] = []

    @beta_tool
    def get_weather(city: str) -> str:
        """Current weather in a city."""
        asked.append(city)
        return WEATHER

    runner = claude.beta.messages.tool_runner(
        model="m", max_tokens=48, tools=[get_weather], tool_choice={"type": "any"}, max_iterations=2,
        extra_body=GREEDY, messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    replies = list(runner)
    (first_body, status, refusal), *answered = exchanges
    assert first_body["thread"] == {"type": "create"} and status == 400
    assert refusal["error"]["type"] == "invalid_request_error" and "thread" in refusal["error"]["message"]
    assert refusal["error"]["details"] == {"error_code": "thread_unsupported_request", "unsupported": ["thread"]}
    assert [status for _body, status, _answer in answered] == [200, 200]
    assert all("thread" not in body for body, _status, _answer in answered)
    assert [reply.stop_reason for reply in replies] == ["tool_use", "tool_use"]
    assert asked and asked[0] == "Paris"
    results = [block for message in answered[1][0]["messages"] if isinstance(message["content"], list)
               for block in message["content"] if block["type"] == "tool_result"]
    assert results and results[0]["content"] == WEATHER


def test_a_thread_is_refused_on_every_request(served):
    """``thread`` in any shape (continuing one too) is the same 400, streamed requests included."""
    for thread, stream in (({"type": "create"}, True), ({"type": "continue", "previous_message_id": "msg_1"}, False)):
        response = httpx.post(f"{served.url}/v1/messages", timeout=60, json={
            "model": "m", "max_tokens": 4, "stream": stream, "thread": thread,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert response.status_code == 400
        assert response.json()["error"]["details"]["error_code"] == "thread_unsupported_request"


def stream_usage(claude: anthropic.Anthropic, **request) -> tuple[dict, dict]:
    """The usage of a streamed message's message_start and message_delta events."""
    with claude.messages.stream(**request) as stream:
        events = list(stream)
    start = next(event for event in events if event.type == "message_start").message.usage
    delta = next(event for event in events if event.type == "message_delta").usage
    return start.model_dump(exclude_none=True), delta.model_dump(exclude_none=True)


def test_a_repeated_prompt_is_read_from_the_cache_as_llama_server_reports_it(served, llama_server):
    """The same request twice: the second reads all of its prompt but the last token from the cache
    (``cache_read_input_tokens``), and ``input_tokens`` counts the rest, as llama-server's /v1/messages
    answers; streamed, message_start and message_delta carry the same (message_delta cumulative)."""
    claude = anthropic.Anthropic(base_url=served.url, api_key="unused")
    system = "You are a careful assistant. Answer briefly."
    request = {"model": "m", "max_tokens": 8, "system": system, "extra_body": GREEDY,
               "messages": [{"role": "user", "content": "Name a red fruit."}]}
    prompt = claude.messages.count_tokens(model="m", system=system, messages=request["messages"]).input_tokens
    first = claude.messages.create(**request)
    assert first.usage.input_tokens + first.usage.cache_read_input_tokens == prompt
    again = claude.messages.create(**request)
    assert (again.usage.cache_read_input_tokens, again.usage.input_tokens) == (prompt - 1, 1)
    assert again.content[0].text == first.content[0].text
    body = {key: value for key, value in request.items() if key != "extra_body"} | GREEDY
    llama_server.post("/v1/messages", body)
    theirs = llama_server.post("/v1/messages", body)
    assert again.usage.model_dump(exclude_none=True) == theirs["usage"]
    start, delta = stream_usage(claude, **request)
    assert start == {**theirs["usage"], "output_tokens": 0}
    assert delta == theirs["usage"]  # llama-server's message_delta has output_tokens alone; Anthropic's all


def test_the_sdk_lists_and_retrieves_models_in_anthropics_shape(served):
    """GET /v1/models is OpenAI's path too: the anthropic SDK (its anthropic-version header says so) gets
    Anthropic's model objects, any other client OpenAI's."""
    import openai

    claude = anthropic.Anthropic(base_url=served.url, api_key="unused")
    page = claude.models.list()
    assert [model.id for model in page.data] == ["smollm2:135m"] and page.has_more is False
    model = claude.models.retrieve("smollm2:135m")
    assert model.type == "model" and model.display_name == "smollm2:135m" and model.created_at.year >= 2026
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.models.retrieve("no-such-model")
    assert missing.value.body["error"]["type"] == "not_found_error"
    listed = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused").models.list()
    assert [entry.id for entry in listed] == ["smollm2:135m"] and listed.data[0].object == "model"


def test_anthropics_routes_this_server_lacks_are_anthropics_404(served):
    """Message batches are not served: the SDK's NotFoundError with Anthropic's ``not_found_error``."""
    claude = anthropic.Anthropic(base_url=served.url, api_key="unused")
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude.messages.batches.list()
    assert missing.value.body == {"type": "error", "error": {
        "type": "not_found_error", "message": "GET /v1/messages/batches: no such route."}}
