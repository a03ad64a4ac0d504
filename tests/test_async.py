"""Async streaming: bounded buffer, cancellation, no leaked threads, loop never blocked."""

from __future__ import annotations

import asyncio
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


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "mullama-stream"]


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
    assert stream.thread is not None and not stream.thread.is_alive()


def test_slow_consumer_keeps_the_producer_within_the_buffer(async_model):
    buffer_size = 4

    async def consume():
        stream = async_model.generate_stream("Generate a long list of fruits:\n-", config=StreamConfig(
            max_tokens=200, temperature=0, buffer_size=buffer_size))
        consumed = 0
        async for _token in stream:
            consumed += 1
            assert stream._channel.qsize() <= buffer_size
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
    assert not stream.thread.is_alive()
    assert stream.finish_reason == "cancelled"


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
        cancelled_at = time.monotonic()
        while stream.thread.is_alive() and time.monotonic() - cancelled_at < 2:
            await asyncio.sleep(0.005)
        stopped_after = time.monotonic() - cancelled_at
        again = [t async for t in async_model.generate_stream("Hello", max_tokens=5, temperature=0)]
        return stream, stopped_after, again

    stream, stopped_after, again = asyncio.run(scenario())
    assert not stream.thread.is_alive()
    assert stopped_after < 0.25  # one token is ~10 ms here; generous for a loaded machine
    assert stream.tokens_generated() < 500
    assert stream_threads() == []
    assert again


def test_the_event_loop_is_never_blocked(async_model):
    async def scenario():
        gaps = []
        done = False

        async def ticker():
            last = time.perf_counter()
            while not done:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        prompt = "A long prompt about many things. " * 150  # a prompt decode of ~1000 tokens
        async for _ in async_model.generate_stream(prompt, max_tokens=32, temperature=0):
            pass
        done = True
        await tick
        return gaps

    gaps = asyncio.run(scenario())
    assert max(gaps) < 0.1, max(gaps)


def test_errors_reach_the_consumer(async_model):
    async def scenario():
        with pytest.raises(mullama.ContextOverflowError):
            async for _ in async_model.generate_stream("word " * 5000, max_tokens=4):
                pass
        with pytest.raises(mullama.InvalidConfigError):
            async_model.generate_stream("hi", max_tokens=0)

    asyncio.run(scenario())
    assert stream_threads() == []


def test_concurrent_async_streams_use_separate_contexts(async_model):
    async def one(prompt):
        return [t.id async for t in async_model.generate_stream(prompt, max_tokens=16, temperature=0)]

    async def scenario():
        return await asyncio.gather(one("The sky is"), one("def add(a, b):"), one("The sky is"))

    first, second, third = asyncio.run(scenario())
    assert first == third
    assert first != second


def test_async_chat_stream(async_model):
    async def scenario():
        messages = [{"role": "user", "content": "What is 2+2?"}]
        return "".join([t.text async for t in async_model.chat_stream(messages, max_tokens=16, temperature=0)])

    assert asyncio.run(scenario()).strip()
