"""Async streaming over the batching engine: bounded buffer, cancellation, loop never blocked."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
from inprocess_server import wait_for

import mullama
from mullama import AsyncModel, StreamConfig


@pytest.fixture(scope="module")
def async_model(model_path):
    loaded = asyncio.run(AsyncModel.load(model_path, n_ctx=2048))
    yield loaded
    asyncio.run(loaded.aclose())


def wait_until_idle(async_model) -> None:
    """Until the engine holds no sequence (bounded only against a hang)."""
    wait_for(lambda: not (async_model.engine.active_streams or async_model.engine.waiting), timeout=300)


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mullama-engine"]


def test_async_stream_equals_the_sync_stream(async_model, model_path):
    async def collect():
        stream = async_model.generate_stream("Tell me about Rust:", config=StreamConfig(max_tokens=32, temperature=0))
        tokens = [token async for token in stream]
        return tokens, stream

    tokens, stream = asyncio.run(collect())
    with mullama.Context(async_model.model, n_ctx=2048) as ctx:
        expected = list(ctx.generate_stream("Tell me about Rust:", max_tokens=32, temperature=0))
    assert [t.id for t in tokens] == [t.id for t in expected]
    assert "".join(t.text for t in tokens) == stream.text
    assert stream.tokens_generated() == len(tokens)
    assert stream.tokens_per_second() > 0
    assert stream.finish_reason in ("stop", "length")
    assert stream.time_to_first_token() is not None


def test_slow_consumer_keeps_the_producer_within_the_buffer(async_model):
    buffer_size = 4

    async def consume():
        stream = async_model.generate_stream("Generate a long list of fruits:\n-", config=StreamConfig(
            max_tokens=200, temperature=0, buffer_size=buffer_size))
        consumed = 0
        async for _token in stream:
            consumed += 1
            assert stream.max_queued <= buffer_size
            assert stream.tokens_generated() <= consumed + buffer_size + 1
            await asyncio.sleep(0.05)
            if consumed == 12:
                break
        at_break = stream.tokens_generated()
        await stream.aclose()
        return stream, consumed, at_break

    stream, consumed, at_break = asyncio.run(consume())
    assert stream.max_queued == buffer_size  # it filled up, and never went past it
    assert stream.tokens_generated() <= at_break + 1  # stopped within one token of the break
    assert stream.tokens_generated() <= consumed + buffer_size + 1
    assert stream.finish_reason == "cancelled"
    wait_until_idle(async_model)


def test_cancelling_the_task_stops_the_producer_and_the_model_streams_again(async_model):
    async def scenario():
        started = asyncio.Event()
        stream = async_model.generate_stream("Write a long story:", config=StreamConfig(max_tokens=500, temperature=0))

        async def consume():
            async for _ in stream:
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(wait_until_idle, async_model)  # it left the engine: nothing more is decoded
        again = [t async for t in async_model.generate_stream("Hello", max_tokens=5, temperature=0)]
        return stream, again

    cancelled = async_model.engine.stats["requests_cancelled"]
    stream, again = asyncio.run(scenario())
    assert async_model.engine.stats["requests_cancelled"] == cancelled + 1
    assert stream.tokens_generated() < 500
    assert stream.finish_reason == "cancelled"
    assert len(engine_threads()) == 1
    assert again


async def loop_turns_during(work):
    """Run ``work()`` and count the event loop's turns meanwhile: a ticker takes one each millisecond
    while the loop is free, none while something blocks it."""
    turns, done = 0, False

    async def ticker():
        nonlocal turns
        while not done:
            await asyncio.sleep(0.001)
            turns += 1

    tick = asyncio.create_task(ticker())
    try:
        result = await work()
    finally:
        done = True
        await tick
    return result, turns


def test_the_event_loop_is_never_blocked(async_model):
    async def work():
        prompt = "A long prompt about many things. " * 150  # a prompt decode of ~1000 tokens
        # (no timeout: on a machine loaded by other work, the long prompt alone may take longer than 30 s)
        async with async_model.generate_stream(prompt, max_tokens=32, temperature=0, timeout_ms=None) as stream:
            return await anext(stream)

    _first, turns = asyncio.run(loop_turns_during(work))
    # tokenising and the prompt's decode (hundreds of ms) ran off the loop: it kept turning meanwhile
    # (had they run on it, the ticker would have had a turn or two between their blocking calls)
    assert turns >= 100, turns


def test_errors_reach_the_consumer(async_model):
    async def scenario():
        with pytest.raises(mullama.ContextOverflowError):
            async for _ in async_model.generate_stream("word " * 5000, max_tokens=4):
                pass
        with pytest.raises(mullama.InvalidConfigError):
            async_model.generate_stream("hi", max_tokens=0)

    asyncio.run(scenario())
    wait_until_idle(async_model)


def test_concurrent_async_streams_are_batched_and_exact(async_model, model):
    """Streams running together share decode steps, and each gives what it gives alone."""
    prompts = ["The sky is", "def add(a, b):", "The sky is", "Once upon a time"]

    async def one(prompt):
        return [t.id async for t in async_model.generate_stream(prompt, max_tokens=16, temperature=0,
                                                                  timeout_ms=None)]

    async def scenario():
        steps_before = async_model.engine.stats["decode_steps"]
        results = await asyncio.gather(*(one(p) for p in prompts))
        return results, async_model.engine.stats["decode_steps"] - steps_before

    results, steps = asyncio.run(scenario())
    assert results[0] == results[2] and results[0] != results[1]
    assert steps < sum(len(r) for r in results)  # tokens of several streams shared decode steps
    with mullama.Context(model, n_ctx=2048) as ctx:
        for prompt, ids in zip(prompts, results):
            assert ids == ctx.generate(prompt, max_tokens=16).token_ids


def test_breaking_out_without_aclose_frees_the_sequence(async_model):
    """`break` drops the stream: its sequence leaves the engine at once, even with the GC off."""
    async def scenario():
        async for token in async_model.generate_stream("Write a long story:", max_tokens=500, temperature=0):
            if token.index == 3:
                break
        await asyncio.to_thread(wait_until_idle, async_model)

    cancelled = async_model.engine.stats["requests_cancelled"]
    gc.disable()
    try:
        asyncio.run(scenario())
    finally:
        gc.enable()
    # cancelled by the dropped stream, not run to its 500 tokens (a cycle would have kept it until a GC)
    assert async_model.engine.stats["requests_cancelled"] == cancelled + 1
    assert len(engine_threads()) == 1


def test_no_context_is_built_on_the_event_loop(model, monkeypatch):
    """An AsyncModel made directly starts its engine in a worker thread, not on the loop."""
    from mullama.generate import _async

    built_on = []  # the threads that built an engine

    class SeenEngine(_async.Engine):
        def __init__(self, *args, **kwargs):
            built_on.append(threading.get_ident())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(_async, "Engine", SeenEngine)

    async def scenario():
        async_model = AsyncModel(model, n_ctx=512, parallel=1)
        text = [t.text async for t in async_model.generate_stream("Hello", max_tokens=4, temperature=0)]
        engine = async_model.engine
        await asyncio.to_thread(engine.close)
        return text, engine, threading.get_ident()

    text, engine, loop_thread = asyncio.run(scenario())
    assert text and engine.closed and isinstance(engine, SeenEngine)
    assert len(built_on) == 1 and built_on[0] != loop_thread


def test_async_chat_stream(async_model):
    async def scenario():
        messages = [{"role": "user", "content": "What is 2+2?"}]
        return "".join([t.text async for t in async_model.chat_stream(messages, max_tokens=16, temperature=0)])

    assert asyncio.run(scenario()).strip()


def test_breaking_out_of_a_stream_still_held_by_a_name_ends_it():
    """The README's pattern (`stream = ...generate_stream(...)`, `async for ... in stream`, `break`) ends
    the sequence though the stream lives on: on one slot, the next stream gets it and completes."""
    async def scenario(model):
        held = model.generate_stream("Count:", max_tokens=64, ignore_eos=True, buffer_size=4)
        async for _token in held:
            break
        after = model.generate_stream("Hello", max_tokens=4, temperature=0)
        # bounded only against a hang: before the fix the held stream kept the slot for good
        text = await asyncio.wait_for(_joined(after), timeout=300)
        return held, after, text

    async def run():
        model = await AsyncModel.load("smollm2:135m", parallel=1, n_ctx=512)
        try:
            return await scenario(model)
        finally:
            await model.aclose()

    held, after, text = asyncio.run(run())
    assert held.finish_reason == "cancelled" and held.tokens_generated() < 64
    assert after.finish_reason == "length" and after.tokens_generated() == 4 and text


async def _joined(stream) -> str:
    return "".join([token.text async for token in stream])


def test_a_model_passed_in_stays_the_callers_and_can_be_shared(model_path):
    """AsyncModel(model) does not take the Model: aclose() leaves it open while a sync Context still
    uses it (it used to refuse with CONTEXT_ERROR, after stopping its engine), and its C objects are
    freed once each: the engine's context by aclose(), the model by its owner."""
    from mullama.native import _owned

    model = mullama.Model.load(model_path)
    context = mullama.Context(model, n_ctx=512, warmup=False)
    freed_before = dict(_owned.freed_count)

    async def scenario():
        shared = AsyncModel(model, n_ctx=512, parallel=1)
        text = await _joined(shared.generate_stream("Hello", max_tokens=4, temperature=0))
        await shared.aclose()
        await shared.aclose()  # twice: nothing more to free
        return text

    assert asyncio.run(scenario())
    freed = {kind: _owned.freed_count[kind] - freed_before.get(kind, 0) for kind in ("engine", "context", "model")}
    assert freed == {"engine": 1, "context": 0, "model": 0}  # the engine's context only
    assert not model.closed and not context.closed
    assert context.generate("Hello", max_tokens=4, temperature=0).text  # both still work
    context.close()
    model.close()
    assert model.closed and _owned.freed_count["model"] == freed_before.get("model", 0) + 1


def test_a_model_that_load_loaded_is_closed_by_aclose(model_path):
    async def scenario():
        own = await AsyncModel.load(model_path, n_ctx=512, parallel=1)
        await _joined(own.generate_stream("Hello", max_tokens=2, temperature=0))
        await own.aclose()
        return own.model

    model = asyncio.run(scenario())
    assert model.closed
    with pytest.raises(mullama.ClosedError):
        model.tokenize("Hello")
