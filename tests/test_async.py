"""Async streaming over the batching engine: bounded buffer, cancellation, loop never blocked."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

import mullama
from mullama import AsyncModel, StreamConfig


@pytest.fixture(scope="module")
def async_model(model_path):
    loaded = asyncio.run(AsyncModel.load(model_path, n_ctx=2048))
    yield loaded
    asyncio.run(loaded.aclose())


def wait_until_idle(async_model, timeout: float = 5.0) -> float:
    """Seconds until the engine holds no sequence (the timeout if it never gets there)."""
    started = time.monotonic()
    while async_model.engine.active_streams or async_model.engine.waiting:
        if time.monotonic() - started > timeout:
            break
        time.sleep(0.005)
    return time.monotonic() - started


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
    assert wait_until_idle(async_model) < 5.0


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
        stopped_after = await asyncio.to_thread(wait_until_idle, async_model)
        produced = stream.tokens_generated()
        await asyncio.sleep(0.1)
        assert stream.tokens_generated() == produced  # nothing more was decoded for it
        again = [t async for t in async_model.generate_stream("Hello", max_tokens=5, temperature=0)]
        return stream, stopped_after, again

    stream, stopped_after, again = asyncio.run(scenario())
    assert stopped_after < 1.0  # the next engine step (~10 ms) frees it; generous for a loaded machine
    assert stream.tokens_generated() < 500
    assert stream.finish_reason == "cancelled"
    assert len(engine_threads()) == 1
    assert again


async def longest_loop_gap(work):
    """Run ``work()`` while a ticker measures the longest the event loop went unresponsive."""
    gaps, done = [], False

    async def ticker():
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        result = await work()
    finally:
        done = True
        await tick
    return result, max(gaps)


def test_the_event_loop_is_never_blocked(async_model):
    async def work():
        prompt = "A long prompt about many things. " * 150  # a prompt decode of ~1000 tokens
        # (no timeout: on a machine loaded by other work, the long prompt alone may take longer than 30 s)
        async for _ in async_model.generate_stream(prompt, max_tokens=32, temperature=0, timeout_ms=None):
            pass

    _, gap = asyncio.run(longest_loop_gap(work))
    assert gap < 0.25, gap  # generous for a loaded machine; blocking work takes far longer


def test_errors_reach_the_consumer(async_model):
    async def scenario():
        with pytest.raises(mullama.ContextOverflowError):
            async for _ in async_model.generate_stream("word " * 5000, max_tokens=4):
                pass
        with pytest.raises(mullama.InvalidConfigError):
            async_model.generate_stream("hi", max_tokens=0)

    asyncio.run(scenario())
    assert wait_until_idle(async_model) < 5.0


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
        return await asyncio.to_thread(wait_until_idle, async_model)

    gc.disable()
    try:
        assert asyncio.run(scenario()) < 1.0
    finally:
        gc.enable()
    assert len(engine_threads()) == 1


def test_no_context_is_built_on_the_event_loop(model):
    """An AsyncModel made directly starts its engine in a worker thread, not on the loop."""
    async def scenario():
        async_model = AsyncModel(model, n_ctx=512, parallel=1)

        async def work():
            return [t.text async for t in async_model.generate_stream("Hello", max_tokens=4, temperature=0)]

        text, gap = await longest_loop_gap(work)
        engine = async_model.engine
        await asyncio.to_thread(engine.close)
        return text, gap, engine

    text, gap, engine = asyncio.run(scenario())
    assert text and engine.closed
    assert gap < 0.25, gap  # generous for a loaded machine; blocking work takes far longer


def test_async_chat_stream(async_model):
    async def scenario():
        messages = [{"role": "user", "content": "What is 2+2?"}]
        return "".join([t.text async for t in async_model.chat_stream(messages, max_tokens=16, temperature=0)])

    assert asyncio.run(scenario()).strip()
