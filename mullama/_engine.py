"""Continuous batching: one thread, one llama context, many streams decoding together.

Each step decodes one batch that holds the next token of every active stream and
chunks of the prompts of new ones; then each stream samples from its own row of
logits with its own sampler chain. New requests join between steps; finished or
cancelled ones leave, and a cancelled stream's KV cells are freed at once. A stream
whose reader is slow pauses alone: its bounded channel is full, so it sits out the
next steps while the others go on. Requests beyond the number of slots wait in a
bounded queue.

Sampling, detokenisation and stop sequences are the core's own (SamplerChain,
TextAssembler, Token): this module only schedules.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ._channel import Channel
from ._config import StreamConfig
from ._context import adopt_context, default_threads
from ._exceptions import (
    ContextError,
    ContextOverflowError,
    MullamaError,
    StreamingError,
)
from ._model import Model
from ._owned import Owned
from ._stream import Token, sampler_for
from ._text import TextAssembler

__all__ = ["Engine", "EngineRequest", "QueueFullError"]

class QueueFullError(MullamaError):
    """Every slot is busy and the waiting queue is full."""

    code = "QUEUE_FULL"


@dataclass(eq=False)
class EngineRequest:
    """One stream in the engine. The consumer reads tokens from it; ``cancel()`` ends it."""

    prompt_tokens: list[int]
    config: StreamConfig
    id: int = 0
    channel: Channel = field(default=None)  # type: ignore[assignment]
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    _cancelled: bool = False

    def __post_init__(self) -> None:
        self.channel = Channel(self.config.buffer_size)

    def cancel(self) -> None:
        """Stop this stream; its slot and KV cells are released by the next step."""
        self._cancelled = True
        self.channel.close()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    async def next_token(self) -> Token | None:
        """The next token, awaited without blocking the event loop; None at the end."""
        return await self.channel.get_async()

    def next_token_blocking(self, timeout: float | None = None) -> Token | None:
        return self.channel.get(timeout)

    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.submitted

    def tokens_per_second(self) -> float:
        if self.first_token_at is None or self.finished_at is None or self.completion_tokens < 2:
            return 0.0
        elapsed = self.finished_at - self.first_token_at
        return (self.completion_tokens - 1) / elapsed if elapsed > 0 else 0.0


class _Slot:
    """A sequence of the shared context, and the request it is serving."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.cached: list[int] = []  # tokens whose KV cells this sequence holds
        self.request: EngineRequest | None = None
        self.pending_prompt: list[int] = []
        self.next_token: int | None = None  # sampled, delivered, not yet decoded
        self.sampler: Any = None
        self.assembler: TextAssembler | None = None
        self.deadline: float | None = None
        self.batch_row = -1
        self.limit = 0  # most tokens this request may produce


class Engine(Owned):
    """A thread that serves many streams from one model with continuous batching."""

    _kind = "engine"
    _close_order = 0

    def __init__(self, model: Model, *, parallel: int = 4, n_ctx: int | None = None, n_batch: int = 512,
                 n_threads: int | None = None, max_queue: int = 64) -> None:
        if parallel < 1:
            raise ContextError("parallel must be at least 1.")
        library = model._library
        ffi, lib = library.ffi, library.lib
        self.model = model
        self.parallel = parallel
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx or min(model.n_ctx_train, 4096) * parallel
        params.n_batch = n_batch
        params.n_ubatch = min(params.n_ubatch, n_batch)
        params.n_seq_max = parallel
        # One KV stream per sequence (llama-server's choice with an explicit --parallel): a stream's
        # attention never sees another's cells, so batching leaves greedy output unchanged.
        params.kv_unified = False
        threads = n_threads or default_threads()
        params.n_threads = params.n_threads_batch = threads
        ptr = lib.llama_init_from_model(model.ptr, params)
        if ptr == ffi.NULL:
            raise ContextError(f"llama.cpp could not create a context of {params.n_ctx} tokens for "
                               f"{parallel} sequences; lower --ctx-size or --parallel.")
        adopt_context(self, library, ptr, model, threads, threads, warmup=True)
        self._compute = library.compute
        self._lib = lib
        self._memory = lib.llama_get_memory(ptr)
        self.n_ctx = lib.llama_n_ctx(ptr)
        self.n_batch = lib.llama_n_batch(ptr)
        self.n_ctx_per_slot = self.n_ctx // parallel
        self._batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._slots = [_Slot(i) for i in range(parallel)]
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._ids = itertools.count(1)
        self.stats = {"requests_total": 0, "requests_finished": 0, "requests_cancelled": 0, "requests_failed": 0,
                      "prompt_tokens_total": 0, "completion_tokens_total": 0, "decode_steps": 0,
                      "decode_seconds": 0.0, "rejected_total": 0}
        self._thread = threading.Thread(target=self._run, name="mullama-engine", daemon=True)
        self._thread.start()

    # --- requests -------------------------------------------------------------------
    def submit(self, prompt_tokens: list[int], config: StreamConfig) -> EngineRequest:
        """Queue a stream; raises QueueFullError when every slot is busy and the queue is full."""
        if not prompt_tokens:
            raise ContextOverflowError("the prompt is empty.")
        if len(prompt_tokens) >= self.n_ctx_per_slot:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_tokens)} tokens but each of the {self.parallel} sequences holds "
                f"{self.n_ctx_per_slot}; shorten it, or start the server with a larger --ctx-size.")
        request = EngineRequest(list(prompt_tokens), config, id=next(self._ids))
        # A reader taking a token may un-pause its stream: let the engine look again.
        request.channel.on_take = self._wake.set
        with self._lock:
            if self._stopping:
                raise QueueFullError("the server is shutting down.")
            busy = sum(1 for s in self._slots if s.request is not None)
            if busy >= self.parallel and len(self._waiting) >= self.max_queue:
                self.stats["rejected_total"] += 1
                raise QueueFullError(f"all {self.parallel} slots are busy and {self.max_queue} requests are "
                                     "waiting; retry later.")
            self._waiting.append(request)
            self.stats["requests_total"] += 1
        self._wake.set()
        return request

    @property
    def active_streams(self) -> int:
        return sum(1 for s in self._slots if s.request is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stop(self, *, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; finish (``drain``) or cancel the ones in flight; end the thread."""
        with self._lock:
            self._stopping = True
            if not drain:
                for request in list(self._waiting) + [s.request for s in self._slots if s.request]:
                    request.cancel()
        self._wake.set()
        self._thread.join(timeout)

    def close(self) -> None:
        if self._thread.is_alive():
            self.stop(drain=False)
        if self._ptr is not None:
            self._lib.llama_batch_free(self._batch)
        super().close()

    # --- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        computing = False  # inside a compute.begin()/end() stretch
        try:
            while True:
                self._wake.clear()  # before looking for work: a later set() is never missed
                self._admit()
                with self._lock:
                    idle = all(s.request is None for s in self._slots)
                    if idle and self._stopping and not self._waiting:
                        return
                if self._step():
                    if not computing:
                        computing = True
                        self._compute.begin()
                    continue
                if computing:  # idle now: let the thread pools sleep
                    computing = False
                    self._compute.end()
                self._wake.wait(0.05)
        except BaseException as exc:  # the engine must never die silently
            for slot in self._slots:
                if slot.request is not None:
                    self._fail(slot, StreamingError(f"the engine failed: {exc}"))
            raise
        finally:
            if computing:
                self._compute.end()

    def _admit(self) -> None:
        """Move waiting requests into free slots, choosing the slot whose cache shares the most."""
        while True:
            with self._lock:
                if not self._waiting:
                    return
                free = [s for s in self._slots if s.request is None]
                if not free:
                    return
                request = self._waiting.popleft()
            if request.cancelled:
                self.stats["requests_cancelled"] += 1
                continue
            slot = max(free, key=lambda s: _common_prefix(s.cached, request.prompt_tokens))
            self._start(slot, request)

    def _start(self, slot: _Slot, request: EngineRequest) -> None:
        prompt = request.prompt_tokens
        common = min(_common_prefix(slot.cached, prompt), len(prompt) - 1)
        if common < len(slot.cached):
            if not self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, common, -1):
                self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                common = 0
            del slot.cached[common:]
        config = request.config
        slot.request = request
        slot.pending_prompt = prompt[common:]
        slot.next_token = None
        slot.sampler = sampler_for(config, self.model.vocab_size)
        slot.assembler = TextAssembler(config.stop_sequences)
        slot.deadline = time.monotonic() + config.timeout_ms / 1000 if config.timeout_ms else None
        slot.limit = min(config.max_tokens, self.n_ctx_per_slot - len(prompt))
        request.cached_tokens = common
        self.stats["prompt_tokens_total"] += len(prompt)

    def _step(self) -> bool:
        """Decode one batch; False when there was nothing to do."""
        batch, lib = self._batch, self._lib
        n = 0
        rows: list[_Slot] = []
        now = time.monotonic()
        for slot in self._slots:  # generation first: one token of every stream that is not paused
            request = slot.request
            if request is None:
                continue
            if request.cancelled:
                self._release(slot, cancelled=True)
                continue
            if slot.deadline is not None and now > slot.deadline:
                self._fail(slot, StreamingError("generation timed out; raise timeout_ms.", code="STREAM_TIMEOUT"))
                continue
            if slot.next_token is not None and request.channel.has_room():
                n = self._add(n, slot.next_token, len(slot.cached), slot.seq_id, True)
                slot.cached.append(slot.next_token)
                slot.next_token = None
                slot.batch_row = n - 1
                rows.append(slot)
        for slot in self._slots:  # then prompt chunks, as much as the batch has room for
            if slot.request is None or not slot.pending_prompt or n >= self.n_batch:
                continue
            take = slot.pending_prompt[: self.n_batch - n]
            del slot.pending_prompt[: len(take)]
            last = not slot.pending_prompt
            for i, token in enumerate(take):
                n = self._add(n, token, len(slot.cached), slot.seq_id, last and i == len(take) - 1)
                slot.cached.append(token)
            if last:
                slot.batch_row = n - 1
                rows.append(slot)
        if n == 0:
            return False
        batch.n_tokens = n
        started = time.perf_counter()
        with self._compute.lock:
            rc = lib.llama_decode(self.ptr, batch)
        self.stats["decode_seconds"] += time.perf_counter() - started
        self.stats["decode_steps"] += 1
        if rc != 0:
            for slot in rows:
                self._fail(slot, StreamingError(f"llama_decode failed with code {rc}; the batch was dropped."))
            return True
        for slot in rows:
            self._sample(slot)
        return True

    def _add(self, n: int, token: int, pos: int, seq_id: int, logits: bool) -> int:
        batch = self._batch
        batch.token[n] = token
        batch.pos[n] = pos
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq_id
        batch.logits[n] = logits
        return n + 1

    def _sample(self, slot: _Slot) -> None:
        request = slot.request
        lib = self._lib
        with self._compute.lock:
            token = lib.llama_sampler_sample(slot.sampler.ptr, self.ptr, slot.batch_row)
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.completion_tokens += 1
        request.token_ids.append(token)
        index = request.completion_tokens - 1
        if not request.config.ignore_eos and lib.llama_vocab_is_eog(self.model._vocab, token):
            finish = "stop"
        else:
            finish = "length" if request.completion_tokens >= slot.limit else None
        text, finish = slot.assembler.add(self.model._cached_piece(token), finish)
        if text:
            request.text_parts.append(text)
        request.channel.offer(Token(token, text, index, finish))  # there is room: checked before decoding
        if finish is not None:
            request.finish_reason = finish
            self._finish(slot)
        else:
            slot.next_token = token

    def _finish(self, slot: _Slot) -> None:
        request = slot.request
        request.finished_at = time.perf_counter()
        self.stats["requests_finished"] += 1
        self.stats["completion_tokens_total"] += request.completion_tokens
        request.channel.finish()
        self._clear(slot)

    def _fail(self, slot: _Slot, error: MullamaError) -> None:
        request = slot.request
        request.finish_reason = "error"
        request.finished_at = time.perf_counter()
        self.stats["requests_failed"] += 1
        request.channel.fail(error)
        self._release(slot, cancelled=False)

    def _release(self, slot: _Slot, *, cancelled: bool) -> None:
        """End the slot's request and free its KV cells (its cache is no use for prefix reuse)."""
        if cancelled:
            request = slot.request
            request.finish_reason = request.finish_reason or "cancelled"
            request.finished_at = time.perf_counter()
            self.stats["requests_cancelled"] += 1
        self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.cached = []
        self._clear(slot)

    def _clear(self, slot: _Slot) -> None:
        if slot.sampler is not None:
            slot.sampler.close()
        slot.request, slot.sampler, slot.assembler, slot.next_token = None, None, None, None
        slot.pending_prompt = []


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
