"""asyncio streaming: a producer thread per stream, a bounded queue, an event loop never blocked.

The producer thread runs the ordinary TokenStream and puts each token into a
``queue.Queue(maxsize=buffer_size)``; when the consumer is slower, the queue fills
and the producer waits, so memory stays bounded. The consumer awaits tokens without
blocking the event loop: the producer wakes it with ``call_soon_threadsafe``.
Cancelling the consuming task, ``aclose()``, or leaving ``async with`` stops the
producer within one token and joins its thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import Any

from ._channel import Channel
from ._config import StreamConfig, resolve_config
from ._context import Context
from ._model import Model
from ._stream import Token, TokenStream

__all__ = ["AsyncModel", "AsyncTokenStream"]

class AsyncTokenStream:
    """An async iterator of :class:`Token`, with the statistics of :class:`TokenStream`."""

    def __init__(self, start_stream, buffer_size: int, on_finish=None) -> None:
        self._start_stream = start_stream  # () -> TokenStream, called in the producer thread
        self._channel = Channel(buffer_size)
        self._thread: threading.Thread | None = None
        self._stream: TokenStream | None = None
        self._done = False
        self._on_finish = on_finish

    @property
    def max_queued(self) -> int:
        """The most tokens ever waiting in the buffer (never more than ``buffer_size``)."""
        return self._channel.max_queued

    # --- producer (its own thread) ------------------------------------------------
    def _produce(self) -> None:
        channel, stream = self._channel, None
        try:
            stream = self._stream = self._start_stream()
            for token in stream:
                if not channel.put(token) or channel.closed.is_set():
                    return
            channel.finish()
        except BaseException as exc:  # delivered to the consumer, raised there
            channel.fail(exc)
        finally:
            if stream is not None:
                stream.close()
            if self._on_finish is not None:
                self._on_finish()

    # --- consumer (the event loop) ------------------------------------------------
    def __aiter__(self) -> AsyncTokenStream:
        return self

    async def __anext__(self) -> Token:
        if self._done:
            raise StopAsyncIteration
        if self._thread is None:
            self._thread = threading.Thread(target=self._produce, name="mullama-stream", daemon=True)
            self._thread.start()
        try:
            item = await self._channel.get_async()
        except asyncio.CancelledError:  # stop the producer, leave no thread behind
            self._shutdown()
            raise
        except BaseException:  # the producer failed and is on its last lines
            await self._join()
            raise
        if item is None:
            await self._join()
            raise StopAsyncIteration
        return item

    async def _join(self) -> None:
        self._done = True
        await asyncio.to_thread(self._thread.join)

    def _shutdown(self) -> None:
        self._done = True
        self._channel.close()

    async def aclose(self) -> None:
        """Stop generating and wait for the producer thread to end."""
        self._shutdown()
        if self._thread is not None and self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        self._channel.closed.set()

    @property
    def thread(self) -> threading.Thread | None:
        """The producer thread (None before the first token is awaited)."""
        return self._thread

    # --- statistics (those of the underlying TokenStream) -------------------------
    def tokens_generated(self) -> int:
        return self._stream.tokens_generated() if self._stream else 0

    def tokens_per_second(self) -> float:
        return self._stream.tokens_per_second() if self._stream else 0.0

    def time_to_first_token(self) -> float | None:
        return self._stream.time_to_first_token() if self._stream else None

    @property
    def finish_reason(self) -> str | None:
        if self._stream is None:
            return None
        if self._channel.closed.is_set() and self._stream.finish_reason in (None, "cancelled"):
            return "cancelled"
        return self._stream.finish_reason

    @property
    def text(self) -> str:
        return self._stream.text if self._stream else ""

    @property
    def token_ids(self) -> list[int]:
        return self._stream.token_ids if self._stream else []


class AsyncModel:
    """A Model for asyncio code: loads off the event loop and streams through a producer thread.

    Each stream runs on a Context from a small pool (created as needed; up to
    ``max_idle_contexts`` are kept for reuse), so consecutive turns keep their KV cache
    and concurrent streams do not collide.
    """

    def __init__(self, model: Model, *, max_idle_contexts: int = 2, **context_options: Any) -> None:
        self.model = model
        self.max_idle_contexts = max_idle_contexts  # kept for reuse (and their KV caches); others are freed
        self._context_options = context_options
        self._idle: list[Context] = []
        self._streams: weakref.WeakSet[AsyncTokenStream] = weakref.WeakSet()
        self._lock = threading.Lock()

    @classmethod
    async def load(cls, model: str | os.PathLike, **options: Any) -> AsyncModel:
        """Load ``model`` (a path or a name) in a worker thread. Context options
        (``n_ctx``, ``n_threads``, ...) apply to the contexts this AsyncModel creates."""
        context_keys = {"n_ctx", "n_batch", "n_threads", "n_threads_batch", "seed", "flash_attn"}
        context_options = {k: options.pop(k) for k in list(options) if k in context_keys}
        loaded = await asyncio.to_thread(Model.load, model, **options)
        return cls(loaded, **context_options)

    def _take_context(self) -> Context:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return Context(self.model, **self._context_options)

    def _give_back(self, context: Context) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle_contexts:
                self._idle.append(context)
                return
        context.close()

    def _async_stream(self, open_stream, config: StreamConfig) -> AsyncTokenStream:
        """An AsyncTokenStream whose producer borrows a pooled Context for ``open_stream(context)``."""
        borrowed: list[Context] = []

        def start() -> TokenStream:
            borrowed.append(self._take_context())
            return open_stream(borrowed[0])

        def finish() -> None:
            while borrowed:
                self._give_back(borrowed.pop())

        stream = AsyncTokenStream(start, config.buffer_size, finish)
        self._streams.add(stream)
        return stream

    def generate_stream(self, prompt: str, config: StreamConfig | int | None = None, *,
                        max_tokens: int | None = None, **options: Any) -> AsyncTokenStream:
        """``async for token in model.generate_stream(prompt, config=...)``."""
        config = resolve_config(config, max_tokens, options)
        return self._async_stream(lambda context: context.generate_stream(prompt, config), config)

    def chat_stream(self, messages: list[dict], config: StreamConfig | int | None = None, *,
                    max_tokens: int | None = None, **options: Any) -> AsyncTokenStream:
        """Stream the reply to ``messages`` with the model's chat template."""
        config = resolve_config(config, max_tokens, options)
        return self._async_stream(lambda context: context.chat_stream(messages, config), config)

    async def generate(self, prompt: str, max_tokens: int | None = None, **options: Any):
        """The whole completion (greedy unless told otherwise), computed off the event loop."""
        context = self._take_context()
        try:
            return await asyncio.to_thread(context.generate, prompt, max_tokens, **options)
        finally:
            self._give_back(context)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any) -> str:
        return self.model.apply_chat_template(messages, add_generation_prompt, **kw)

    async def aclose(self) -> None:
        """Stop every stream (joining its thread), then free the pooled contexts and the model."""
        for stream in list(self._streams):
            await stream.aclose()
        with self._lock:
            idle, self._idle = self._idle, []
        for context in idle:
            context.close()
        self.model.close()

    async def __aenter__(self) -> AsyncModel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


