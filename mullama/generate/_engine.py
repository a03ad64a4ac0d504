"""Continuous batching: one thread, one llama context, many sequences decoding together.

Each step decodes one batch that holds the next token of every active sequence and chunks of the prompts of new
ones; then each sequence samples from its own row of logits. New requests join between steps; finished or cancelled
ones leave, and a cancelled sequence's KV cells are freed at once. A request whose reader is slow pauses alone: its
bounded channel is full, so it sits out the next steps while the others go on. Requests beyond the number of slots
wait in a bounded queue. A prompt with images or audio has its chunks through the last media evaluated (by mtmd)
when it is admitted; the text after them is batched as any prompt's.

What a token means (sampling, text, stop sequences, limits, timeouts, statistics) is decided by each request's
``Sequence`` (mullama.generate._sequence), the same one a ``Context`` steps: this module only schedules. If the
thread ever dies, every request it held fails with EngineError, ``submit`` refuses new ones, and ``alive`` says so.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from .._exceptions import (
    ContextOverflowError,
    EngineError,
    InvalidConfigError,
    MullamaError,
    QueueFullError,
    decode_error,
    detached,
)
from ..native._owned import Owned
from ._arguments import check_seed
from ._batch import TokenBatch
from ._config import StreamConfig
from ._context import Context
from ._context_params import (
    MAX_SEQUENCES,
    ContextSettings,
    adopt_context,
    check_count,
    check_n_ctx,
    chunk_end,
    common_prefix,
    create_context,
    default_n_ctx,
    prompt_breaks,
    reusable_prefix,
    trim_cache,
)
from ._draft_model import DraftModelDrafter, check_draft_model, no_draft_model_error
from ._engine_request import EngineRequest, _Slot
from ._lora import LoraSet, apply_lora, batch_lora, lora_set
from ._media import MediaPrompt
from ._model import Model
from ._prompt_cache import DEFAULT_CACHE_RAM_MIB, MIB, PromptCache
from ._sequence import Sequence
from ._speculative import draft_token_cost

__all__ = ["Engine", "EngineRequest", "QueueFullError"]


class Engine(Owned):
    """A thread that serves many sequences from one model with continuous batching.

    ``parallel`` sequences decode together, each with ``n_ctx`` tokens of context (default:
    the model's trained length, at most 4096); up to ``max_queue`` more requests wait.
    ``seed`` seeds every request whose config sets none. ``cache_ram_mib`` bounds the host
    memory that keeps earlier prompts' KV states (llama-server's ``--cache-ram``: 0 turns it
    off, -1 sets no bound; see mullama.generate._prompt_cache).
    """

    _kind = "engine"
    _close_order = 0

    def __init__(self, model: Model, *, parallel: int = 4, n_ctx: int | None = None, n_batch: int = 2048,
                 n_threads: int | str | None = None, max_queue: int = 64, seed: int | None = None,
                 flash_attn: bool | None = None, cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB,
                 speculative: Mapping[str, Any] | None = None,
                 draft_model: Model | str | os.PathLike[str] | None = None) -> None:
        if not isinstance(model, Model):
            raise InvalidConfigError(f"Engine needs a mullama.Model, not {type(model).__name__}.")
        if isinstance(cache_ram_mib, bool) or not isinstance(cache_ram_mib, int) or cache_ram_mib < -1:
            raise InvalidConfigError(f"cache_ram_mib must be -1 (no limit), 0 (off) or a size in MiB, "
                                     f"not {cache_ram_mib!r}.")
        check_n_ctx(n_ctx)
        check_count("parallel", parallel, MAX_SEQUENCES, allow_none=False)
        settings = ContextSettings(n_ctx=(n_ctx or default_n_ctx(model)) * parallel, n_batch=n_batch,
                                   n_threads=n_threads, n_seq_max=parallel, flash_attn=flash_attn)
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
            raise InvalidConfigError(f"max_queue must be a non-negative integer, not {max_queue!r}.")
        check_seed(seed)
        # Speculative decoding for every request whose config asks for none (llama-server's --spec-type).
        self.speculative = dict(speculative or {})
        if StreamConfig(**self.speculative).speculative == "draft" and draft_model is None:  # bad settings fail now
            raise no_draft_model_error()
        self.model = model
        self.parallel = parallel
        self.seed = seed
        self.flash_attn = flash_attn  # as asked: None is upstream's "auto"
        ptr = create_context(model, settings)
        self._record_step = adopt_context(self, model, ptr, settings, warmup=True)
        library = model._library
        self._compute = library.compute
        self._lock = library.compute.lock_for(model.offloaded)
        self._lib = lib = library.lib
        self._memory = lib.llama_get_memory(ptr)
        self.n_ctx = lib.llama_n_ctx(ptr)
        self.n_batch = lib.llama_n_batch(ptr)
        self.n_ctx_per_slot = lib.llama_n_ctx_seq(ptr) or self.n_ctx // parallel
        self._batch = TokenBatch(lib, self.n_batch)
        self._slots = [_Slot(i) for i in range(parallel)]
        self._lora: LoraSet = ()  # the adapters applied to the context (see _lora.batch_lora)
        self._turn = 0
        self.prompt_cache = (PromptCache(library.ffi, lib, cache_ram_mib * MIB)
                             if cache_ram_mib != 0 and not model.needs_checkpoints else None)
        self._waiting: collections.deque[EngineRequest] = collections.deque()
        self._between_steps: collections.deque[Callable[[], bool]] = collections.deque()  # see run_between_steps
        self.max_queue = max_queue
        self._state = threading.Lock()  # guards _waiting, _stopping, failure
        self._wake = threading.Event()
        self._stopping = False
        self.failure: BaseException | None = None  # why the thread died, if it did
        self._ids = itertools.count(1)
        self.stats = {"requests_total": 0, "requests_finished": 0, "requests_cancelled": 0, "requests_failed": 0,
                      "prompt_tokens_total": 0, "completion_tokens_total": 0, "decode_steps": 0,
                      "decode_seconds": 0.0, "rejected_total": 0}
        # The thread holds a weak reference: an engine nobody holds is stopped and freed.
        # A draft model (speculative="draft"): one context of it per slot; loaded here from a path, and then ours.
        self._draft_owned = draft_model if draft_model is None or isinstance(draft_model, Model) else \
            Model.load(draft_model)
        self._drafts: list[Context] = []
        if self._draft_owned is not None:
            check_draft_model(model, self._draft_owned)
            self._drafts = [Context(self._draft_owned, n_ctx=self.n_ctx_per_slot, n_batch=n_batch, n_threads=n_threads,
                                    flash_attn=flash_attn) for _ in range(parallel)]
            for context in self._drafts:
                context._belong_to_another()
            if self._draft_owned is draft_model:
                self._draft_owned = None
        self._thread = threading.Thread(target=_serve, args=(weakref.ref(self), self._wake),
                                        name="mullama-engine", daemon=True)
        self._thread.start()

    # --- requests -------------------------------------------------------------------
    def submit(self, prompt_tokens: list[int], config: StreamConfig, media: MediaPrompt | None = None, *,
               slot: int | None = None) -> EngineRequest:
        """Queue a sequence (``media``: its prompt's images or audio); ``slot`` pins it to one slot, waiting while
        it is busy (llama-server's ``id_slot``: modulo ``parallel``, negative for any). Raises QueueFullError when
        every slot is busy and the queue is full, ContextOverflowError when the prompt cannot fit, EngineError."""
        if slot is not None and (isinstance(slot, bool) or not isinstance(slot, int)):
            raise InvalidConfigError(f"slot must be an integer or None, not {slot!r}.")
        if not isinstance(config, StreamConfig):
            raise InvalidConfigError(f"config must be a StreamConfig, not {type(config).__name__}.")
        if not prompt_tokens:
            raise InvalidConfigError("the prompt is empty; give at least one token of text.")
        self.model._check_tokens(prompt_tokens if media is None else media.text_tokens)
        if len(prompt_tokens) >= self.n_ctx_per_slot:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_tokens)} tokens but each of the {self.parallel} sequences holds "
                f"{self.n_ctx_per_slot}; shorten it, or use a larger context size.")
        self._check_alive()
        lora = lora_set(self.model, config.lora)
        if config.speculative == "draft" and not self._drafts:
            raise no_draft_model_error()
        if self.speculative and config.speculative is None:
            config = config.with_options(**self.speculative)
        sequence = Sequence(self.model, list(prompt_tokens), config, n_ctx=self.n_ctx_per_slot,
                            default_seed=self.seed, media=media, draft_token_cost=draft_token_cost(self.flash_attn))
        request = EngineRequest(sequence, next(self._ids), self._wake)
        request.lora = lora
        if slot is not None and slot >= 0:
            request.pinned_slot = slot % self.parallel
        with self._state:
            self._check_alive()
            if self._stopping:
                raise QueueFullError("the engine is shutting down; retry on another server.")
            busy = sum(1 for s in self._slots if s.request is not None)
            if busy + len(self._waiting) >= self.parallel + self.max_queue:
                self.stats["rejected_total"] += 1
                raise QueueFullError(f"all {self.parallel} slots are busy and {self.max_queue} requests are "
                                     "waiting; retry later.")
            sequence.begin()
            self._waiting.append(request)
            self.stats["requests_total"] += 1
        self._wake.set()
        return request

    def run_between_steps(self, action: Callable[[], bool]) -> None:
        """Have the engine's thread call ``action()`` between two steps, and again before each later
        step while it returns False. It must not raise (mullama.generate._slots' actions hold a Future)."""
        self._check_alive()
        self._between_steps.append(action)
        self._wake.set()

    def _check_alive(self) -> None:
        self.model._relays.check()  # a lost RPC server: RpcServerLostError at once
        if self.failure is not None:
            raise EngineError(f"the engine stopped after an internal error ({self.failure!r}); "
                              "restart it (or the server).")
        if self._ptr is None:
            raise EngineError("the engine is closed.")

    @property
    def alive(self) -> bool:
        """False once the engine's thread has died or the engine was closed."""
        return self.failure is None and self._ptr is not None and self._thread.is_alive()

    @property
    def active_streams(self) -> int:
        return sum(1 for s in self._slots if s.request is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stop(self, *, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; finish (``drain``) or cancel the ones in flight; end the thread."""
        with self._state:
            self._stopping = True
            if not drain:
                for request in list(self._waiting) + [s.request for s in self._slots if s.request]:
                    request.cancel()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def close(self) -> None:
        """Cancel every request, end the thread, free the context (refused if a decode outlasts the wait)."""
        if self._thread.is_alive():
            self.stop(drain=False, timeout=30)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            raise EngineError("the engine's thread did not stop within 30 s; not freeing its context.")
        super().close()
        self._batch.close()
        for context in self._drafts:
            context.close()
        if self._draft_owned is not None:
            self._draft_owned.close()

    # --- the engine thread -------------------------------------------------------------
    def _run_once(self) -> bool | None:
        """One round: admit, run the actions (on slots requests did not take), step. True if it decoded,
        False if idle, None when it should end."""
        self._wake.clear()  # before looking for work: a later set() is never missed
        self._admit()
        for _ in range(len(self._between_steps)):
            action = self._between_steps.popleft()
            if not action():
                self._between_steps.append(action)
        with self._state:
            idle = all(s.request is None for s in self._slots)
            if idle and self._stopping and not self._waiting:
                return None
        return self._step()

    def _die(self, exc: BaseException) -> None:
        """The thread is ending on an error: fail everything it held and refuse new work."""
        with self._state:
            self.failure = exc
            waiting, self._waiting = list(self._waiting), collections.deque()
        error = EngineError(f"the engine stopped after an internal error ({exc!r}); restart it (or the server).")
        requests = [s.request for s in self._slots if isinstance(s, _Slot) and s.request is not None] + waiting
        for request in requests:  # each one is told, whatever state the slots are in
            request._sequence.fail(error)
            request.channel.fail(error)
            request._sequence.close()

    def _admit(self) -> None:
        """Move waiting requests into free slots, choosing the slot whose cache shares the most."""
        while True:
            with self._state:
                if not self._waiting:
                    return
                free = [s for s in self._slots if s.request is None]
                if not free:
                    return
                # the first in line that can start: a request pinned to a busy slot lets the next one go
                request = next((r for r in self._waiting if r.cancelled or r.pinned_slot is None
                                or self._slots[r.pinned_slot].request is None), None)
                if request is None:
                    return
                self._waiting.remove(request)
                slot = None
                if not request.cancelled:  # reserved under the lock, so submit() counts it as busy
                    prompt = request._sequence.prompt_tokens
                    slot = self._slots[request.pinned_slot] if request.pinned_slot is not None else \
                        max(free, key=lambda s: common_prefix(s.cached, prompt) if s.lora == request.lora else -1)
                    slot.request = request
                    request.slot_id = slot.seq_id
            if slot is None:
                request._sequence.cancel()
                request._sequence.close()
                self.stats["requests_cancelled"] += 1
                continue
            self._start(slot, request)

    def _start(self, slot: _Slot, request: EngineRequest) -> None:
        """Begin serving ``request`` in ``slot`` (reserved for it): keep the cache's common prefix."""
        prompt = request._sequence.prompt_tokens
        reuse = request._sequence.reuses_cache
        if slot.lora != request.lora:  # cells computed with other adapters: of no use
            self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.forget_cache()
            slot.lora = request.lora
        if reuse and self.prompt_cache is not None and not request.lora:  # the cache holds base-model states
            self.prompt_cache.swap(self.ptr, slot, self._slots, prompt)
        media = request._sequence.media  # chunks through its last image or audio are evaluated now, whole
        keep = reusable_prefix(slot.cached, prompt, reuse) if media is None else media.reusable(slot.cached, reuse)
        common = trim_cache(self._lib, self._memory, slot.seq_id, slot.cached, keep, slot.positions)
        if media is not None:
            try:
                media.evaluate_head(self.ptr, slot.seq_id, slot.cached, slot.positions, self.n_batch, self._lock)
            except MullamaError as exc:  # this request's failure alone
                return self._fail(slot, exc)
        slot.pending_prompt = prompt[len(slot.cached):]
        slot.breaks = prompt_breaks(self.model, len(prompt), self.n_batch)
        slot.next_token = None
        request._sequence.cached_tokens = common
        if request.config.speculative == "draft" and media is None:  # the slot's own context of the draft model
            request._sequence.drafter = DraftModelDrafter(self._drafts[slot.seq_id], request.config.draft_max)
        self.stats["prompt_tokens_total"] += len(prompt)

    def _step(self) -> bool:
        """Decode one batch; False when there was nothing to do."""
        batch = self._batch
        n = 0
        rows: list[_Slot] = []  # sequences that sample after this decode
        scored: list[tuple[Sequence, int, int, int]] = []  # prompt chunks to score: (sequence, first row, position, n)
        members: list[_Slot] = []  # every sequence with tokens in the batch
        lora, self._turn = batch_lora(self._slots, self._turn, self._lora)  # sequences with another set wait
        for slot in self._slots:  # generation first: one token of every sequence that is not paused
            request = slot.request
            if request is None:
                continue
            if request.cancelled:
                self._release(slot, cancelled=True)
                continue
            try:
                request._sequence.check_deadline()
            except MullamaError as exc:
                self._fail(slot, exc)
                continue
            token = slot.next_token
            if token is not None and request.channel.has_room() and slot.lora == lora and n < self.n_batch:
                sequence, shift = request._sequence, slot.positions.shift  # shift: after an M-RoPE image
                if sequence.drafter is not None:  # speculative decoding: a draft verified in the same batch
                    room = min(request.channel.free(), self.n_batch - n) - 1  # after the token
                    slot.draft = sequence.draft(slot.cached, token, self.n_ctx_per_slot)[:room] if room else []
                slot.batch_row = n
                n = batch.put(n, token, len(slot.cached) + shift, slot.seq_id, True)
                slot.cached.append(token)
                for drafted in slot.draft:  # empty without speculation
                    n = batch.put(n, drafted, len(slot.cached) + shift, slot.seq_id, True)
                    slot.cached.append(drafted)
                slot.next_token = None
                rows.append(slot)
                members.append(slot)
        for slot in self._slots:  # then prompt chunks, as much as the batch has room for
            if slot.request is None or not slot.pending_prompt or n >= self.n_batch or slot.lora != lora:
                continue
            position, shift = len(slot.cached), slot.positions.shift
            take = slot.pending_prompt[: chunk_end(position, self.n_batch - n, slot.breaks) - position]
            del slot.pending_prompt[: len(take)]
            last = not slot.pending_prompt
            sequence = slot.request._sequence
            every = sequence.config.prompt_logprobs is not None  # every row's logits score the next prompt token
            for i, token in enumerate(take):
                n = batch.put(n, token, len(slot.cached) + shift, slot.seq_id, every or (last and i == len(take) - 1))
                slot.cached.append(token)
            if every:
                scored.append((sequence, n - len(take), position, len(take)))
            members.append(slot)
            if last:
                slot.batch_row = n - 1
                rows.append(slot)
        if n == 0:
            return False
        if lora != self._lora:
            apply_lora(self.model, self.ptr, lora)
            self._lora = lora
        with self._lock:
            started = time.perf_counter()
            rc = batch.decode(self.ptr, n)
            elapsed = time.perf_counter() - started
            if self._record_step is not None and rc == 0 and n == len(rows):  # token steps only
                self._record_step(elapsed, n)
        self.stats["decode_seconds"] += elapsed
        self.stats["decode_steps"] += 1
        if (lost := self.model._relays.error(self._lib, self.ptr)) or rc != 0:  # its sequences fail (lost server: all)
            for slot in [slot for slot in self._slots if slot.request is not None] if lost else members:
                assert slot.request is not None
                processed = slot.request._sequence.n_tokens
                self._fail(slot, lost or decode_error(rc, n_ctx=self.n_ctx_per_slot, processed=processed))
            return True
        if scored:
            with self._lock:
                for sequence, first_row, position, count in scored:
                    sequence.score_prompt(self.ptr, first_row, position, count)
        for slot in rows:
            try:
                self._sample(slot)
            except MullamaError as exc:  # one request's failure is that request's alone
                self._fail(slot, exc)
        return True

    def _sample(self, slot: _Slot) -> None:
        request = slot.request
        assert request is not None
        sequence = request._sequence
        if sequence.prompt_done is None:
            sequence.prompt_decoded(sequence.cached_tokens)
        if sequence.drafter is None:
            token = sequence.next_token(self.ptr, slot.batch_row, self._lock)
            request.channel.offer(token)  # there is room: checked before decoding
        else:
            with self._lock:
                out = sequence.verify(self.ptr, slot.batch_row, slot.draft)
            rejected = len(slot.draft) + 1 - len(out)
            if rejected:  # their cells leave the cache
                del slot.cached[-rejected:]
                self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, len(slot.cached) + slot.positions.shift, -1)
            slot.draft = []
            for token in out:
                request.channel.offer(token)  # there is room: the draft was cut to it
        if token.finish_reason is not None:
            self._finish(slot)
        else:
            slot.next_token = token.id

    def _finish(self, slot: _Slot) -> None:
        request = slot.request
        assert request is not None
        self.stats["requests_finished"] += 1
        self.stats["completion_tokens_total"] += request._sequence.n_tokens
        request.channel.finish()
        self._clear(slot)

    def _fail(self, slot: _Slot, error: BaseException) -> None:
        request = slot.request
        assert request is not None
        # Raised here, its traceback holds the engine's frames: kept, it would keep the engine (and thread) alive.
        error = detached(error)
        request._sequence.fail(error)
        self.stats["requests_failed"] += 1
        request.channel.fail(error)
        self._release(slot, cancelled=False)

    def _release(self, slot: _Slot, *, cancelled: bool) -> None:
        """End the slot's request and free its KV cells (its cache is no use for prefix reuse)."""
        if cancelled:
            assert slot.request is not None
            slot.request._sequence.cancel()
            self.stats["requests_cancelled"] += 1
        self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.forget_cache()
        self._clear(slot)

    def _clear(self, slot: _Slot) -> None:
        if slot.request is not None:
            slot.request._sequence.close()
        slot.request, slot.next_token = None, None
        slot.pending_prompt, slot.draft = [], []


def _serve(engine_ref: weakref.ref[Engine], wake: threading.Event) -> None:
    """The engine's thread. It holds the engine only while there is work, so an engine that
    nobody holds anymore is freed (and this thread ends)."""
    computing, compute = False, None  # computing: inside a compute.begin()/end() stretch
    try:
        while True:
            engine = engine_ref()
            if engine is None or engine._ptr is None:
                return
            compute = engine._compute
            try:
                outcome = engine._run_once()
            except BaseException as exc:  # the engine must never die silently
                engine._die(exc)
                raise
            if outcome is None:
                return
            if outcome:
                if not computing:
                    computing = True
                    compute.begin()
                continue
            if computing:  # idle now: let the thread pools sleep
                computing = False
                compute.end()
            del engine
            wake.wait(0.5)
    finally:
        if computing and compute is not None:
            compute.end()

