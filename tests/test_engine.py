"""The batching engine and the server's app, in this process: stepping, cancellation, queueing,
failure, ordering — on the real model, the app served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from inprocess_server import serving, wait_for

import mullama
from mullama import StreamConfig
from mullama.generate._engine import Engine

GREEDY = StreamConfig(max_tokens=16, temperature=0)
LONG = StreamConfig(max_tokens=400, temperature=0, ignore_eos=True)


def read_all(request) -> list:
    """Every token of an engine request (None ends it; a failure raises)."""
    async def collect():
        tokens = []
        while (token := await request.next_token()) is not None:
            tokens.append(token)
        return tokens
    return asyncio.run(collect())


@pytest.fixture()
def engine(model):
    with Engine(model, parallel=3, n_ctx=512) as running:
        yield running


def test_many_sequences_step_together_and_each_is_exact(engine, model, context):
    prompts = ["The sky is", "def add(a, b):", "Once upon a time", "Paris is", "1, 2, 3,", "Hello"]
    requests = [engine.submit(model.tokenize(p), GREEDY) for p in prompts]
    assert engine.waiting + engine.active_streams <= len(prompts)
    results = [read_all(r) for r in requests]
    for prompt, tokens, request in zip(prompts, results, requests):
        assert [t.index for t in tokens] == list(range(len(tokens)))  # in order, none lost
        assert tokens[-1].finish_reason in ("stop", "length") and request.finish_reason == tokens[-1].finish_reason
        assert [t.id for t in tokens] == context.generate(prompt, max_tokens=16).token_ids
        assert request.text == "".join(t.text for t in tokens)
        assert request.time_to_first_token() > 0 and request.tokens_generated() == len(tokens)
    assert engine.stats["requests_finished"] == len(prompts)
    assert engine.stats["decode_steps"] < sum(len(r) for r in results)  # batched, not one by one


def test_cancel_frees_the_sequence_at_the_next_step(engine, model):
    request = engine.submit(model.tokenize("Write a long story:"), LONG)

    async def two_then_cancel():
        await request.next_token()
        await request.next_token()
        request.cancel()
    asyncio.run(two_then_cancel())
    wait_for(lambda: engine.active_streams == 0, timeout=300)  # it left the engine: nothing more is decoded
    assert request.tokens_generated() < 400
    assert request.finish_reason == "cancelled"
    assert engine.stats["requests_cancelled"] == 1


def test_a_full_queue_refuses_and_a_freed_slot_admits(model):
    with Engine(model, parallel=1, n_ctx=512, max_queue=1) as engine:
        first = engine.submit(model.tokenize("Write a long story:"), LONG)
        second = engine.submit(model.tokenize("Hello"), GREEDY)
        with pytest.raises(mullama.QueueFullError) as info:
            engine.submit(model.tokenize("Hi"), GREEDY)
        assert info.value.code == "QUEUE_FULL"
        first.cancel()
        assert read_all(second)[-1].finish_reason in ("stop", "length")


def test_a_request_pinned_to_a_busy_slot_waits_and_others_go_ahead(model, context):
    """llama-server's id_slot: a request pinned to a busy slot waits for it (slot numbers wrap), an
    unpinned one behind it takes the free slot, and the pinned one then runs where it asked."""
    with Engine(model, parallel=2, n_ctx=512) as engine:
        # never read: its channel fills and it pauses, holding slot 0 until cancelled
        holder = engine.submit(model.tokenize("Write a long story:"),
                               LONG.with_options(buffer_size=2, timeout_ms=None), slot=0)
        pinned = engine.submit(model.tokenize("Hello"), GREEDY, slot=2)  # 2 % 2: slot 0
        free = engine.submit(model.tokenize("Paris is"), GREEDY)
        assert [t.id for t in read_all(free)] == context.generate("Paris is", max_tokens=16).token_ids
        assert (holder.slot_id, free.slot_id, pinned.slot_id) == (0, 1, -1)
        assert engine.waiting == 1  # the pinned request, behind a slot that cannot free itself
        holder.cancel()
        assert [t.id for t in read_all(pinned)] == context.generate("Hello", max_tokens=16).token_ids
        assert pinned.slot_id == 0
        any_slot = engine.submit(model.tokenize("Hi"), GREEDY, slot=-1)  # negative: any slot
        read_all(any_slot)
        assert any_slot.slot_id in (0, 1)
        with pytest.raises(mullama.InvalidConfigError, match="slot must be an integer"):
            engine.submit(model.tokenize("Hi"), GREEDY, slot="0")


def test_a_timeout_ends_only_its_sequence(engine, model):
    slow = engine.submit(model.tokenize("Write a long story:"), LONG.with_options(timeout_ms=200))
    fine = engine.submit(model.tokenize("Hello"), GREEDY)
    with pytest.raises(mullama.StreamTimeoutError):
        read_all(slow)
    assert slow.finish_reason == "error"
    assert read_all(fine)[-1].finish_reason in ("stop", "length")


def test_bad_parameters_are_invalid_config(model):
    for options in ({"parallel": 0}, {"parallel": -1}, {"parallel": "2"}, {"parallel": 10**6}, {"n_ctx": -5},
                    {"n_ctx": 2**40}, {"n_threads": 2**31}, {"max_queue": -1}, {"seed": 2**64}):
        with pytest.raises(mullama.InvalidConfigError) as info:
            Engine(model, **options)
        assert info.value.code == "INVALID_CONFIG" and next(iter(options)) in str(info.value)


def test_empty_prompt_is_the_same_error_everywhere(engine, context):
    with pytest.raises(mullama.InvalidConfigError):
        engine.submit([], GREEDY)
    with pytest.raises(mullama.InvalidConfigError):
        list(context.generate_stream("", max_tokens=2))


def test_engine_seed_makes_sampling_reproducible(model):
    config = StreamConfig(max_tokens=12, temperature=1.0)
    runs = []
    for _ in range(2):
        with Engine(model, parallel=1, n_ctx=512, seed=7) as engine:
            runs.append([t.id for t in read_all(engine.submit(model.tokenize("Tell me a story:"), config))])
    assert runs[0] == runs[1]


@pytest.fixture()
def served(model):
    with serving(model, parallel=2, n_ctx=512) as running:
        yield running


def test_sse_chunks_come_in_order(served, context):
    server, _engine = served
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    messages = [{"role": "user", "content": "Name a colour."}]
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and chunks.index(finishes[0]) == len(chunks) - 2
    assert chunks[-1].usage.completion_tokens <= 16 and not chunks[-1].choices
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(t.text for t in context.chat_stream(messages, max_tokens=16, temperature=0))


def test_unknown_role_is_a_400_naming_it(served):
    server, _engine = served
    response = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "wizard", "content": "Hi"}], "max_tokens": 2})
    assert response.status_code == 400
    assert "wizard" in response.json()["error"]["message"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected fault
def test_a_dead_engine_fails_its_requests_and_health_says_503(served, model):
    server, engine = served
    waiting_config = StreamConfig(max_tokens=400, temperature=0, ignore_eos=True)
    running = [engine.submit(model.tokenize("Write a long story:"), waiting_config) for _ in range(3)]
    wait_for(lambda: engine.active_streams == 2, timeout=300)
    engine._slots.append(None)  # fault injection: the next step raises inside the engine's thread
    for request in running:  # active and queued alike fail with a clear error, nothing hangs
        with pytest.raises(mullama.EngineError) as info:
            read_all(request)
        assert info.value.code == "ENGINE_FAILED"
    wait_for(lambda: not engine.alive, timeout=300)
    with pytest.raises(mullama.EngineError):
        engine.submit(model.tokenize("Hi"), GREEDY)
    health = httpx.get(server.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "error"
    answer = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "engine_failed"
    engine._slots.pop()


def test_a_disconnected_sse_client_frees_its_sequence(served):
    server, engine = served
    body = {"prompt": "Write a long story:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    cancelled = engine.stats["requests_cancelled"]  # before: the engine may see the client leave at once
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                json.loads(line[6:])
                break
    wait_for(lambda: engine.active_streams == 0, timeout=300)
    assert engine.stats["requests_cancelled"] == cancelled + 1  # it stopped because the client left
