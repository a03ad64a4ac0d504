"""asyncio streaming over the batching engine: concurrent streams decode together.

An :class:`AsyncModel` owns one :class:`~mullama.generate._engine.Engine` (created off the event
loop): every async stream of the model is a sequence in it, so N concurrent streams
share each ``llama_decode`` instead of taking turns. Each stream still hands its tokens
through its own ``queue.Queue(maxsize=buffer_size)``: a slow consumer pauses only its
own sequence, and memory stays bounded. The event loop never runs a template, a
tokeniser or a decode. Cancelling the consuming task, ``aclose()``, leaving
``async with``, breaking out of ``async for`` or dropping the stream ends its sequence
at the engine's next step; no thread is left behind, because no stream has one.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from .._exceptions import StreamingError
from ._arguments import check_kwargs
from ._chat_turn import chat_turn, turn_tokens
from ._completion import Completion, greedy_unless_told
from ._config import StreamConfig, resolve_config
from ._context_params import check_n_ctx
from ._engine import Engine, EngineRequest
from ._infill import infill_prompt
from ._media import MediaPrompt
from ._model import Model, check_prompt
from ._prompt_cache import DEFAULT_CACHE_RAM_MIB
from ._rerank import Ranked
from ._sequence import SequenceView, Token

__all__ = ["AsyncModel", "AsyncTokenStream", "submit_in_thread"]

T = TypeVar("T")

ENGINE_OPTIONS = frozenset({"parallel", "n_ctx", "n_batch", "n_threads", "seed", "flash_attn", "max_queue",
                            "cache_ram_mib", "draft_model"})


class AsyncTokenStream(SequenceView):
    """An async iterator of :class:`Token`, with the statistics of :class:`~mullama.TokenStream`."""

    def __init__(self, start: Callable[[], EngineRequest]) -> None:
        # Renders and tokenises the prompt, then submits it (in a worker thread); None once started.
        self._start: Callable[[], EngineRequest] | None = start
        self._request: EngineRequest | None = None
        self._sequence = None
        self._done = False
        self._closed = False

    @property
    def max_queued(self) -> int:
        """The most tokens ever waiting in the buffer (never more than ``buffer_size``)."""
        return self._request.channel.max_queued if self._request else 0

    def __aiter__(self) -> AsyncIterator[Token]:
        # A generator of our own rather than the stream itself: when an ``async for`` breaks, the loop
        # drops it and asyncio closes it, which ends the sequence even while the stream is still held
        # by a name (the stream itself gets no signal from a ``break``).
        return self._until_the_loop_ends()

    async def _until_the_loop_ends(self) -> AsyncIterator[Token]:
        try:
            while True:
                try:
                    token = await self.__anext__()
                except StopAsyncIteration:
                    return
                yield token
        finally:
            if not self._done:  # the loop left before the end: a break, or an exception in its body
                self._closed = True
                self._end()

    async def _begin(self) -> EngineRequest:
        # Once started, the stream no longer needs ``start`` (which holds the AsyncModel): a stream
        # that outlives its model, or sits in a reference cycle, does not keep the engine running.
        start, self._start = self._start, None
        if start is None:
            raise StreamingError("this stream is being started by another task; iterate a stream in one task.")
        request = await submit_in_thread(start, EngineRequest.cancel)
        self._request, self._sequence = request, request._sequence
        # Dropped without aclose() (a `break` out of `async for`): end the sequence anyway.
        weakref.finalize(self, request.cancel)
        return request

    async def __anext__(self) -> Token:
        if self._done:
            raise StopAsyncIteration
        try:
            request = self._request or await self._begin()
            token = await request.next_token()
        except BaseException:  # a failure, or the task was cancelled: the sequence ends here
            self._end()
            raise
        if token is None:
            self._done = True
            raise StopAsyncIteration
        return token

    def _end(self) -> None:
        self._done = True
        if self._request is not None:
            self._request.cancel()

    async def aclose(self) -> None:
        """Stop generating (the engine frees the sequence at its next step)."""
        if not self._done:
            self._closed = True
        self._end()

    async def __aenter__(self) -> AsyncTokenStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def finish_reason(self) -> str | None:
        reason = super().finish_reason
        return "cancelled" if reason is None and self._closed else reason

    def __repr__(self) -> str:
        return f"<mullama.AsyncTokenStream tokens={self.tokens_generated()} finish_reason={self.finish_reason!r}>"


async def submit_in_thread(start: Callable[[], T], undo: Callable[[T], object], *,
                           run_in: Callable[[Callable[[], T]], Awaitable[T]] = asyncio.to_thread) -> T:
    """``start()`` (render, tokenise, submit: CPU work) in a worker thread, never on the event loop
    (``run_in`` picks the thread: the default executor's unless a server gives a pool of its own).
    If the awaiting task is cancelled meanwhile, ``undo`` is applied to what it still makes (the
    requests it submitted are cancelled)."""
    started = asyncio.ensure_future(run_in(start))
    try:
        return await asyncio.shield(started)
    except asyncio.CancelledError:
        def undo_when_done(future: asyncio.Future[Any]) -> None:
            if not future.cancelled() and future.exception() is None:
                undo(future.result())

        started.add_done_callback(undo_when_done)
        raise
    finally:
        # When start() raised, the future holds its exception, whose traceback holds this frame (and
        # start's, with what start holds: an AsyncModel): without this, a cycle for the cyclic GC.
        del started, start


class AsyncModel:
    """A Model for asyncio code: loads off the event loop, streams through a batching engine.

    ``parallel`` streams decode together (more wait, up to ``max_queue``), each with
    ``n_ctx`` tokens of context; a stream reuses the KV cache of an earlier one that shares
    its prompt's beginning, so a follow-up chat turn only decodes what is new; prompts that
    other streams pushed out of every sequence are kept in host memory, up to ``cache_ram_mib``
    MiB (0: off, -1: no bound), and restored when they serve a new prompt. ``seed`` seeds every
    stream whose StreamConfig sets none. ``draft_model`` (a Model, or a path the engine loads) drafts
    for streams with ``speculative="draft"`` (docs/speculative.md).

    A Model passed in stays the caller's: it may be shared (with Contexts, other AsyncModels), and
    :meth:`aclose` leaves it open; close it yourself (or let garbage collection free it). A model that
    :meth:`load` loaded belongs to the AsyncModel, and :meth:`aclose` closes it.
    """

    def __init__(self, model: Model, *, parallel: int = 4, n_ctx: int | None = None, n_batch: int = 2048,
                 n_threads: int | str | None = None, seed: int | None = None, flash_attn: bool | None = None,
                 max_queue: int = 256, cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB,
                 draft_model: Model | str | os.PathLike[str] | None = None) -> None:
        check_n_ctx(n_ctx)  # now, not when the first stream starts the engine
        self.model = model
        self._owns_model = False  # True once load() made the model: then aclose() closes it
        self._engine_options: dict[str, Any] = {
            "parallel": parallel, "n_ctx": n_ctx, "n_batch": n_batch, "n_threads": n_threads, "seed": seed,
            "flash_attn": flash_attn, "max_queue": max_queue, "cache_ram_mib": cache_ram_mib,
            "draft_model": draft_model}
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    @classmethod
    async def load(cls, model: str | os.PathLike[str], **options: Any) -> AsyncModel:
        """Load ``model`` (a path or a name) and start its engine, in a worker thread. Engine
        options (``parallel``, ``n_ctx``, ``n_threads``, ``seed``, ...) go to the engine; the rest
        to :meth:`Model.load`. The model is the AsyncModel's own: :meth:`aclose` closes it."""
        engine_options = {k: options.pop(k) for k in list(options) if k in ENGINE_OPTIONS}
        loaded = await asyncio.to_thread(Model.load, model, **options)
        try:
            async_model = cls(loaded, **engine_options)
            async_model._owns_model = True
            await asyncio.to_thread(async_model._get_engine)
        except BaseException:
            loaded.close()
            raise
        return async_model

    @property
    def engine(self) -> Engine | None:
        """The engine, once started (by ``load`` or the first stream)."""
        return self._engine

    def _get_engine(self) -> Engine:
        """The engine, created on first use (in a worker thread: never on the event loop)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self.model, **self._engine_options)
            return self._engine

    def _stream(self, prepare: Callable[[], tuple[str | list[int] | MediaPrompt, StreamConfig]]) -> AsyncTokenStream:
        """A stream of the prompt ``prepare()`` makes in a worker thread: text, token ids, or a prompt with
        images or audio."""
        model = self.model

        def start() -> EngineRequest:
            engine = self._get_engine()
            prompt, config = prepare()
            tokens, media = (prompt, None) if isinstance(prompt, list) else turn_tokens(model, prompt)
            return engine.submit(tokens, config, media)

        return AsyncTokenStream(start)

    def generate_stream(self, prompt: str, config: StreamConfig | int | None = None, *,
                        max_tokens: int | None = None, **options: Any) -> AsyncTokenStream:
        """``async for token in model.generate_stream(prompt, config=...)``."""
        config = resolve_config(config, max_tokens, options)
        check_prompt(prompt)
        return self._stream(lambda: (prompt, config))

    def chat_stream(self, messages: list[dict[str, Any]], config: StreamConfig | int | None = None, *,
                    max_tokens: int | None = None, tools: list[dict[str, Any]] | None = None, tool_choice: Any = "auto",
                    parallel_tool_calls: bool = True, chat_template: str | os.PathLike[str] | None = None,
                    chat_template_kwargs: dict[str, Any] | None = None, reasoning_format: str = "auto",
                    **options: Any) -> AsyncTokenStream:
        """Stream the reply to ``messages`` with the model's chat template; tools and templates as
        :meth:`Context.chat_stream` (rendered in a worker thread)."""
        resolved = resolve_config(config, max_tokens, options)
        template_kwargs = check_kwargs("chat_template_kwargs", chat_template_kwargs)  # now, not in the worker
        return self._stream(lambda: chat_turn(
            self.model, messages, resolved, tools=tools, tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls, chat_template=chat_template,
            chat_template_kwargs=template_kwargs, reasoning_format=reasoning_format))

    def infill(self, prefix: str | list[str | int], suffix: str | list[str | int],
               config: StreamConfig | int | None = None, *,
               max_tokens: int | None = None, prompt: str = "", extra: Sequence[Mapping[str, Any]] = (),
               spm: bool = False, **options: Any) -> AsyncTokenStream:
        """Stream the middle between ``prefix`` and ``suffix``, as :meth:`Context.infill` (the budget
        of each part from one stream's context size; the prompt built in a worker thread)."""
        resolved = resolve_config(config, max_tokens, options)

        def prepare() -> tuple[str | list[int], StreamConfig]:
            engine = self._get_engine()
            return infill_prompt(self.model, prefix, suffix, prompt=prompt, extra=extra,
                                 n_ctx=engine.n_ctx_per_slot, n_batch=engine.n_batch, spm=spm), resolved

        return self._stream(prepare)

    async def generate(self, prompt: str, max_tokens: int | None = None, *, config: StreamConfig | None = None,
                       **options: Any) -> Completion:
        """The whole completion (greedy unless told otherwise), as :meth:`Context.generate`."""
        greedy_unless_told(config, options)
        started = time.perf_counter()
        stream = self.generate_stream(prompt, config, max_tokens=max_tokens, **options)
        async with stream:
            async for _ in stream:
                pass
        return Completion.from_stream(stream, time.perf_counter() - started)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kw: Any) -> str:
        return self.model.apply_chat_template(messages, add_generation_prompt, **kw)

    async def embed(self, texts: Any, **options: Any) -> Any:
        """:meth:`Model.embed` in a worker thread: the event loop never waits for tokenising or a
        decode. Concurrent calls share decodes."""
        return await asyncio.to_thread(self.model.embed, texts, **options)

    async def rerank(self, query: str, documents: Sequence[str], **options: Any) -> list[Ranked]:
        """:meth:`Model.rerank` in a worker thread: the pairs are decoded off the event loop."""
        return await asyncio.to_thread(self.model.rerank, query, documents, **options)

    async def aclose(self) -> None:
        """Stop every stream, end the engine's thread and free the engine; then close the model if it is
        this AsyncModel's own (:meth:`load` loaded it). A Model passed to ``AsyncModel(model)`` stays open:
        it is its caller's, who may still use it (with a Context, say)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)
        if self._owns_model:
            self.model.close()

    async def __aenter__(self) -> AsyncModel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

