"""The finer points of the wire formats that the APIs' specs state and their official clients rely
on, on the real server and model: logprobs describe exactly the text returned (a stop sequence's
tokens left out), streamed or not; null means absent; ``"usage": null`` on every chunk before the
usage chunk; ``GET /v1/models/{model}``; one ``max_tokens`` cap for every route; and errors that
name the request's own fields."""

from __future__ import annotations

import json

import anthropic
import httpx
import ollama
import openai
import pytest
from inprocess_server import serving

from mullama.server import ServerSettings

COUNT = [{"role": "user", "content": "Count from 1 to 10 separated by commas."}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")


def _sse(url: str, body: dict) -> list[dict]:
    """The ``data:`` payloads of a streamed answer, up to ``[DONE]``."""
    payloads = []
    with httpx.stream("POST", url, json=body, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "data: [DONE]":
                return payloads
            if line.startswith("data: "):
                payloads.append(json.loads(line[6:]))
    raise AssertionError("the stream ended without [DONE]")


def test_chat_logprobs_leave_out_a_stop_sequences_tokens_streamed_or_not(client):
    request = {"model": "m", "messages": COUNT, "max_tokens": 30, "temperature": 0, "logprobs": True,
               "top_logprobs": 2, "stop": ["3."]}
    whole = client.chat.completions.create(**request).choices[0]
    assert whole.finish_reason == "stop" and "3." not in whole.message.content
    tokens = whole.logprobs.content
    assert "".join(t.token for t in tokens) == whole.message.content  # nothing of "3." is described
    streamed = [t for chunk in client.chat.completions.create(**request, stream=True)
                for choice in chunk.choices if choice.logprobs for t in choice.logprobs.content]
    assert [t.model_dump() for t in streamed] == [t.model_dump() for t in tokens]


def test_completion_logprobs_leave_out_a_stop_sequences_tokens_streamed_or_not(client):
    request = {"model": "m", "prompt": "Count: 1, 2,", "max_tokens": 30, "temperature": 0, "logprobs": 1,
               "stop": [" 7,"]}
    whole = client.completions.create(**request).choices[0]
    assert whole.finish_reason == "stop" and whole.text.endswith(" 6,")
    logprobs = whole.logprobs
    assert "".join(logprobs.tokens) == whole.text
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.tokens)
    offsets, at = [], 0
    for token in logprobs.tokens:
        offsets.append(at)
        at += len(token)
    assert logprobs.text_offset == offsets
    chunks = [choice.logprobs for chunk in client.completions.create(**request, stream=True)
              for choice in chunk.choices if choice.logprobs]
    assert [t for piece in chunks for t in piece.tokens] == logprobs.tokens
    assert [p for piece in chunks for p in piece.token_logprobs] == logprobs.token_logprobs
    assert [o for piece in chunks for o in piece.text_offset] == logprobs.text_offset  # offsets in the whole text


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": COUNT, "max_tokens": 4}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4}),
    ("/v1/responses", {"input": "Hello", "max_output_tokens": 16}),
])
def test_null_stream_and_parallel_tool_calls_are_the_defaults_on_openai_routes(served, path, body):
    # Null is absent for a field the route does not know too (clients that write out their whole model).
    answer = httpx.post(served.url + path, json={"model": "m", **body, "stream": None, "parallel_tool_calls": None,
                                                 "audio": None, "web_search_options": None}, timeout=120)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"  # not streamed
    if path == "/v1/responses":
        assert answer.json()["parallel_tool_calls"] is True


def test_chat_fields_openai_clients_set_are_accepted(client):
    """OpenAI's prompt-cache, safety and moderation hints and verbosity change nothing here (frameworks set
    them from their settings); reasoning_effort reaches the template, whose SmolLM2 version has no such
    variable (test_prediction has predicted outputs). Fields the server cannot honour stay a 400 when set."""
    request = {"model": "m", "messages": COUNT, "max_tokens": 12, "temperature": 0}
    plain = client.chat.completions.create(**request).choices[0].message.content
    hinted = client.chat.completions.create(
        **request, prompt_cache_key="k", prompt_cache_retention="24h", safety_identifier="user-1", verbosity="low",
        reasoning_effort="low", extra_body={"moderation": None, "prompt_cache_options": {}})
    assert hinted.choices[0].message.content == plain
    for field, value in [("web_search_options", {}), ("audio", {"voice": "alloy", "format": "wav"})]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**request, extra_body={field: value})
        assert refused.value.body["param"] == field


def test_null_stream_is_the_default_on_anthropic_and_ollama_routes(served):
    message = httpx.post(f"{served.url}/v1/messages", json={"model": "m", "max_tokens": 4, "stream": None,
                                                           "messages": COUNT}, timeout=120)
    assert message.status_code == 200 and message.json()["type"] == "message"
    lines = httpx.post(f"{served.url}/api/chat", json={"model": "m", "messages": COUNT, "stream": None,
                                                       "options": {"num_predict": 4}}, timeout=120)
    assert lines.status_code == 200 and lines.headers["content-type"] == "application/x-ndjson"  # ollama's default
    assert json.loads(lines.text.splitlines()[-1])["done"] is True


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": COUNT}),
    ("/v1/completions", {"prompt": "Once upon a time"}),
])
def test_with_include_usage_every_chunk_but_the_last_says_usage_null(served, path, body):
    request = {"model": "m", **body, "max_tokens": 6, "stream": True, "ignore_eos": True}  # six, never fewer
    chunks = _sse(served.url + path, {**request, "stream_options": {"include_usage": True}})
    assert len(chunks) > 2 and all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    assert not any("usage" in chunk for chunk in _sse(served.url + path, request))  # not asked: not there


def test_stream_options_take_openais_include_obfuscation(client):
    chunks = list(client.chat.completions.create(model="m", messages=COUNT, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True, "include_obfuscation": False}))
    assert chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=COUNT, max_tokens=4, stream=True,
                                       stream_options={"include_usage": True, "bogus": 1})
    assert "has no field 'bogus'" in caught.value.message and caught.value.body["param"] == "stream_options"


def test_anthropics_message_delta_carries_the_whole_usage(served):
    """Anthropic's message_delta usage is cumulative, input tokens (and those read from the cache)
    included: LangChain's ChatAnthropic reads a stream's usage from that event alone, its input tokens
    the whole prompt's (the two summed)."""
    from langchain_anthropic import ChatAnthropic

    client = anthropic.Anthropic(base_url=served.url, api_key="unused")
    with client.messages.stream(model="m", max_tokens=6, messages=COUNT) as stream:
        deltas = [event for event in stream if event.type == "message_delta"]
        final = stream.get_final_message()
    assert len(deltas) == 1 and deltas[0].usage.input_tokens == final.usage.input_tokens > 0
    assert deltas[0].usage.output_tokens == final.usage.output_tokens
    chat = ChatAnthropic(base_url=served.url, api_key="unused", model="m", max_tokens=6)
    whole = None
    for chunk in chat.stream(COUNT[0]["content"]):
        whole = chunk if whole is None else whole + chunk
    prompt = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert whole is not None and whole.usage_metadata["input_tokens"] == prompt


def test_models_retrieve_answers_the_listed_object_and_404_for_another_name(client):
    listed = {model.id: model for model in client.models.list()}
    retrieved = client.models.retrieve("smollm2:135m")
    assert retrieved == listed["smollm2:135m"] and retrieved.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:  # even though this one-model server generates for any name
        client.models.retrieve("no-such-model")
    assert caught.value.status_code == 404 and caught.value.code == "model_not_found"
    assert caught.value.body["param"] == "model" and "GET /v1/models" in caught.value.body["message"]


def test_setting_errors_name_the_requests_own_field(served, client):
    with pytest.raises(openai.BadRequestError) as caught:  # refused when the sampler is set up
        client.chat.completions.create(model="m", messages=COUNT, max_tokens=2, logit_bias={"99999999": 1})
    assert caught.value.body["param"] == "logit_bias"
    assert caught.value.body["message"].startswith("logit_bias names token 99999999")
    with pytest.raises(openai.BadRequestError) as caught:  # refused when the sequence is made
        client.completions.create(model="m", prompt="Hi", max_tokens=2, extra_body={"top_k": 10**6})
    assert caught.value.body["param"] == "top_k" and caught.value.body["message"].startswith("top_k must be")
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=served.url).chat(model="m", messages=COUNT, options={"temperature": "hot"})
    assert refused.value.status_code == 400
    assert refused.value.error == "options.temperature must be a number in [0.0, 100.0], not 'hot'."
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=served.url).generate(model="m", prompt="Hi", options={"top_k": 10**6})
    assert refused.value.error.startswith("options.top_k must be at most the vocabulary size")


@pytest.fixture(scope="module")
def capped(model):
    """A server whose --max-tokens-limit is 5."""
    with serving(model, settings=ServerSettings(model_name="smollm2:135m", max_tokens_limit=5), parallel=1,
                 n_ctx=1024) as (server, _engine):
        yield server


def test_max_tokens_above_the_limit_is_capped_on_every_route(capped):
    """Greedy: the answer is longer than five tokens, so each route stops at the cap."""
    story = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    claude = anthropic.Anthropic(base_url=capped.url, api_key="unused")
    message = claude.messages.create(model="m", max_tokens=1000, messages=story, extra_body={"temperature": 0})
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 5
    gpt = openai.OpenAI(base_url=f"{capped.url}/v1", api_key="unused")
    reply = gpt.chat.completions.create(model="m", messages=story, max_tokens=1000, temperature=0)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    response = gpt.responses.create(model="m", input=story[0]["content"], max_output_tokens=1000, temperature=0)
    assert response.status == "incomplete" and response.usage.output_tokens == 5
    answer = ollama.Client(host=capped.url).chat(model="m", messages=story,
                                                 options={"num_predict": 1000, "temperature": 0})
    assert answer.done_reason == "length" and answer.eval_count == 5
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):  # below 1 is still refused
        claude.messages.create(model="m", max_tokens=0, messages=story)


def test_usage_counts_the_prompt_tokens_the_cache_kept_streamed_or_not(client):
    """A repeated request reuses its slot's prompt (all but the last token, which is decoded again for
    its logits); the usage says so, read when the engine has admitted it (it once raced the engine)."""
    messages = [{"role": "system", "content": "You count the prompt cache's tokens."}, *COUNT]
    request = {"model": "m", "messages": messages, "max_tokens": 2, "temperature": 0}
    client.chat.completions.create(**request)
    for _ in range(3):
        again = client.chat.completions.create(**request).usage
        assert again.prompt_tokens_details.cached_tokens == again.prompt_tokens - 1
        chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
        streamed = chunks[-1].usage
        assert streamed.prompt_tokens_details.cached_tokens == streamed.prompt_tokens - 1


def test_modalities_text_is_accepted_and_audio_refused_by_name(client):
    answer = client.chat.completions.create(model="m", messages=COUNT, max_tokens=2, modalities=["text"])
    assert answer.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=COUNT, max_tokens=2, modalities=["text", "audio"])
    assert refused.value.body["param"] == "modalities" and "answers in text" in refused.value.message
