"""A llama.cpp context: the KV cache of one conversation, and the token loop on top of it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._config import StreamConfig, resolve_config
from ._exceptions import (
    ClosedError,
    ContextError,
    ContextOverflowError,
    InvalidConfigError,
    StreamingError,
)
from ._model import Model
from ._owned import Owned
from ._sampler import SamplerChain
from ._stream import TokenStream

__all__ = ["Completion", "Context"]

DEFAULT_MAX_CTX = 4096

# llama_decode's return codes
_DECODE_OK, _DECODE_NO_SLOT, _DECODE_ABORTED = 0, 1, 2


def default_threads() -> int:
    """Threads for decoding: the CPUs this process may run on (at most 8)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    return max(1, min(available, 8))


@dataclass
class Completion:
    """The result of :meth:`Context.generate`."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of generation or a stop sequence), "length" (max_tokens or context full)
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    timings: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


def _positive(name: str, value: Any, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidConfigError(f"{name} must be a positive integer, not {value!r}.")


def warm_up(library: Any, ptr: Any, model: Model) -> None:
    """One empty run, as upstream's tools do at start: weights and buffers are touched now,
    not during the first request. The cache is cleared afterwards."""
    ffi, lib = library.ffi, library.lib
    tokens = [t for t in (model.bos_token_id, model.eos_token_id) if t >= 0] or [0]
    array = ffi.new("llama_token[]", tokens)
    lib.llama_set_warmup(ptr, True)
    with library.compute.lock:
        lib.llama_decode(ptr, lib.llama_batch_get_one(array, len(tokens)))
    lib.llama_memory_clear(lib.llama_get_memory(ptr), True)
    lib.llama_synchronize(ptr)
    lib.llama_perf_context_reset(ptr)
    lib.llama_set_warmup(ptr, False)


def adopt_context(owner: Owned, library: Any, ptr: Any, model: Model, n_threads: int, n_threads_batch: int,
                  *, warmup: bool) -> None:
    """Make ``owner`` own the llama context ``ptr``: computing on the shared thread pools,
    freed before its model, registered with its model."""
    lib = library.lib
    library.compute.attach(ptr, n_threads, n_threads_batch)
    if warmup:
        warm_up(library, ptr, model)

    def free(context_ptr: Any, _model: Any = model.ptr) -> None:
        # The closure holds the model's pointer object, so the model is freed after us.
        lib.llama_free(context_ptr)

    owner._own(library.ffi, ptr, free)
    model._register(owner)


class Context(Owned):
    """One llama.cpp context over a :class:`Model`.

    It keeps its KV cache between calls and reuses the longest common token prefix
    with the previous prompt, so a follow-up turn only decodes what is new.
    A Context is used by one thread at a time; give each thread its own.
    """

    _kind = "context"

    def __init__(self, model: Model, *, n_ctx: int | None = None, n_batch: int = 512,
                 n_threads: int | None = None, n_threads_batch: int | None = None,
                 seed: int | None = None, flash_attn: bool | None = None, warmup: bool = True) -> None:
        if not isinstance(model, Model):
            raise InvalidConfigError(f"Context needs a mullama.Model, not {type(model).__name__}.")
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_threads", n_threads),
                            ("n_threads_batch", n_threads_batch)):
            _positive(name, value)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise InvalidConfigError(f"seed must be a non-negative integer, not {seed!r}.")
        library = model._library
        ffi, lib = library.ffi, library.lib
        self.model = model  # keeps the model alive as long as this context
        self.seed = seed
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx or min(model.n_ctx_train, DEFAULT_MAX_CTX)
        params.n_batch = min(n_batch, params.n_ctx)
        params.n_ubatch = min(params.n_ubatch, params.n_batch)
        params.n_seq_max = 1
        threads = n_threads or default_threads()
        params.n_threads = threads
        params.n_threads_batch = n_threads_batch or threads
        params.no_perf = False
        if flash_attn is not None:  # upstream's default is "auto" (-1); keep it unless asked
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ptr = lib.llama_init_from_model(model.ptr, params)
        if ptr == ffi.NULL:
            raise ContextError(f"llama.cpp could not create a context with n_ctx={params.n_ctx}; "
                               "try a smaller n_ctx (memory) or enable logging for 'mullama.llama_cpp'.")
        adopt_context(self, library, ptr, model, params.n_threads, params.n_threads_batch, warmup=warmup)
        self._compute = library.compute
        self._lib, self._model_vocab = lib, model._vocab
        self._memory = lib.llama_get_memory(ptr)
        self.n_ctx = lib.llama_n_ctx(ptr)
        self.n_batch = lib.llama_n_batch(ptr)
        self.n_threads = threads
        self._tokens: list[int] = []  # what the KV cache holds, in order
        self._guard = threading.Lock()
        # One-token batch, built once: the loop rewrites _token_buf[0] and decodes (no allocation).
        self._token_buf = ffi.new("llama_token[1]")
        self._one_token_batch = lib.llama_batch_get_one(self._token_buf, 1)
        self._deadline: float | None = None
        self._abort = threading.Event()
        self._abort_cb = ffi.callback("ggml_abort_callback", self._should_abort)
        self._generation = 0  # bumped by each generation; an older one then stops

    # --- KV cache ---------------------------------------------------------------
    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values are in the cache, in order."""
        return list(self._tokens)

    def clear(self) -> None:
        """Forget everything: the next prompt is decoded from scratch."""
        with self._use():
            self._lib.llama_memory_clear(self._memory, True)
            self._tokens = []

    def _trim(self, keep: int) -> None:
        """Keep the first ``keep`` tokens of the cache, drop the rest."""
        if keep < len(self._tokens):
            if not self._lib.llama_memory_seq_rm(self._memory, 0, keep, -1):
                self._lib.llama_memory_clear(self._memory, True)
                keep = 0
            del self._tokens[keep:]

    def _use(self) -> _Exclusive:
        return _Exclusive(self)

    @staticmethod
    def _busy_error() -> ContextError:
        return ContextError("this Context is being used by another thread at the same time; "
                            "give each thread its own Context (they can share one Model).")

    # --- decoding ---------------------------------------------------------------
    def _should_abort(self, _data: Any) -> bool:
        return self._abort.is_set() or (self._deadline is not None and time.monotonic() > self._deadline)

    def decode(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the cache (logits of the last one are kept for sampling)."""
        self.model._check_tokens(list(tokens))
        with self._compute.busy(), self._use():
            self._decode(list(tokens))

    def _decode(self, tokens: list[int], deadline: float | None = None) -> None:
        if not tokens:
            return
        if len(self._tokens) + len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"{len(tokens)} new tokens + {len(self._tokens)} cached do not fit in the context of "
                f"{self.n_ctx} tokens; shorten the prompt, clear() the context, or create it with a larger n_ctx."
            )
        ffi, lib, ptr = self._ffi, self._lib, self.ptr
        use_abort = deadline is not None
        if use_abort:  # only around prompt decodes: ggml polls it at every graph node
            self._deadline = deadline
            lib.llama_set_abort_callback(ptr, self._abort_cb, ffi.NULL)
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                array = ffi.new("llama_token[]", chunk)
                with self._compute.lock:
                    rc = lib.llama_decode(ptr, lib.llama_batch_get_one(array, len(chunk)))
                if rc != _DECODE_OK:
                    self._decode_failed(rc, len(self._tokens))
                self._tokens.extend(chunk)
        finally:
            if use_abort:
                lib.llama_set_abort_callback(ptr, ffi.NULL, ffi.NULL)
                self._deadline = None

    def _decode_failed(self, rc: int, keep: int) -> None:
        # A failed or aborted decode may leave finished chunks in the cache: drop them.
        self._lib.llama_memory_seq_rm(self._memory, 0, keep, -1)
        if rc == _DECODE_ABORTED:
            raise StreamingError("generation timed out while processing the prompt; raise timeout_ms "
                                 "or shorten the prompt.", code="STREAM_TIMEOUT")
        if rc == _DECODE_NO_SLOT:
            raise ContextOverflowError(f"the KV cache is full ({self.n_ctx} tokens); clear() the context "
                                       "or create it with a larger n_ctx.")
        raise StreamingError(f"llama_decode failed with code {rc}; enable logging for 'mullama.llama_cpp' "
                             "for llama.cpp's reason.")

    def _prepare_prompt(self, prompt_tokens: list[int], deadline: float | None = None) -> int:
        """Make the cache hold exactly ``prompt_tokens``, decoding only what differs.

        Returns how many prompt tokens were reused from the cache.
        """
        if not prompt_tokens:
            raise InvalidConfigError("the prompt is empty; give at least one token of text.")
        if len(prompt_tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_tokens)} tokens but the context holds {self.n_ctx}; "
                "shorten the prompt or create the Context with a larger n_ctx."
            )
        common = 0
        for cached, wanted in zip(self._tokens, prompt_tokens):
            if cached != wanted:
                break
            common += 1
        # Logits are only there for the last decoded token: re-decode at least one.
        common = min(common, len(prompt_tokens) - 1)
        self._trim(common)
        self._decode(prompt_tokens[common:], deadline)
        return common

    def generate_token_ids(self, prompt_tokens: list[int], sampler: SamplerChain, max_tokens: int,
                           *, deadline: float | None = None, stats: dict | None = None,
                           ignore_eos: bool = False) -> Iterator[int]:
        """The token loop: prompt in, sampled token ids out.

        It ends after an end-of-generation token (which is yielded, as upstream counts
        it), after ``max_tokens``, or when the context is full. Before the last token is
        yielded, ``stats["finish_reason"]`` is set ("stop" or "length"); ``stats`` also
        receives ``prompt_tokens``, ``cached_tokens`` and ``prompt_seconds``.
        With ``ignore_eos`` an end-of-generation token is just another token.
        Closing the generator stops at once and leaves the cache consistent. Starting
        another generation on this Context ends this one (its next step raises ContextError).
        """
        stats = stats if stats is not None else {}
        stats.update(prompt_tokens=len(prompt_tokens), cached_tokens=0, finish_reason=None)
        _positive("max_tokens", max_tokens, allow_none=False)
        with self._compute.busy():
            with self._use():
                self._generation += 1
                generation = self._generation
                start = time.perf_counter()
                stats["cached_tokens"] = self._prepare_prompt(prompt_tokens, deadline)
                stats["prompt_seconds"] = time.perf_counter() - start
            yield from self._token_loop(generation, sampler, max_tokens, deadline, stats, ignore_eos)

    def _enter_step(self, generation: int | None = None) -> None:
        """Take the context for one step (of ``generation``, when given); release ``_guard`` after it.

        Another thread using it, a closed context, or a newer generation each raise a clear error.
        """
        if not self._guard.acquire(False):
            raise self._busy_error()
        if self._ptr is None:
            self._guard.release()
            raise ClosedError("this context is closed; create a new one to go on.")
        if generation is not None and generation != self._generation:
            self._guard.release()
            raise ContextError("another generation started on this Context, which ends this one; "
                               "use one Context per concurrent stream.")

    def _token_loop(self, generation: int, sampler: SamplerChain, max_tokens: int, deadline: float | None,
                    stats: dict, ignore_eos: bool) -> Iterator[int]:
        lib, ptr, smpl, vocab = self._lib, self.ptr, sampler.ptr, self._model_vocab
        buf, batch, tokens, guard, n_ctx = self._token_buf, self._one_token_batch, self._tokens, self._guard, self.n_ctx
        compute = self._compute.lock
        produced = 0
        while True:
            self._enter_step(generation)
            try:
                with compute:  # sampling takes the cores too: not beside another context's decode
                    token = lib.llama_sampler_sample(smpl, ptr, -1)
            finally:
                guard.release()
            produced += 1
            if not ignore_eos and lib.llama_vocab_is_eog(vocab, token):
                stats["finish_reason"] = "stop"
            elif produced >= max_tokens or len(tokens) >= n_ctx:
                stats["finish_reason"] = "length"
            yield token
            if stats["finish_reason"] is not None:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise StreamingError(f"generation timed out after {produced} tokens; raise timeout_ms "
                                     "or lower max_tokens.", code="STREAM_TIMEOUT")
            self._enter_step(generation)
            try:
                buf[0] = token
                with compute:
                    rc = lib.llama_decode(ptr, batch)
                if rc != _DECODE_OK:
                    self._decode_failed(rc, len(tokens))
                tokens.append(token)
            finally:
                guard.release()

    # --- the public streaming API -------------------------------------------------
    def _tokenize_prompt(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise InvalidConfigError(f"the prompt must be a str, not {type(prompt).__name__}.")
        # As upstream's server and tools do: BOS/EOS as the model wants, special-token text parsed.
        return self.model.tokenize(prompt, add_special=True, parse_special=True)

    def generate_stream(self, prompt: str, config: StreamConfig | int | None = None, *,
                        max_tokens: int | None = None, **options: Any) -> TokenStream:
        """Stream the completion of ``prompt``, token by token.

        Call it as ``generate_stream(prompt, config=StreamConfig(...))``,
        ``generate_stream(prompt, 500)`` or ``generate_stream(prompt, max_tokens=500,
        temperature=0)`` (keyword options override fields of ``config``).
        """
        config = resolve_config(config, max_tokens, options)
        return TokenStream(self, self._tokenize_prompt(prompt), config)

    def generate_streaming(self, prompt: str, max_tokens: int | None = None,
                           callback: Callable[[str], bool | None] | None = None, *,
                           config: StreamConfig | None = None, **options: Any) -> TokenStream:
        """Call ``callback(text)`` for every token's text; returning False stops generation.

        Returns the finished TokenStream, for its statistics.
        """
        if callback is None or not callable(callback):
            raise InvalidConfigError("generate_streaming needs a callback(text) -> bool.")
        stream = self.generate_stream(prompt, config, max_tokens=max_tokens, **options)
        with stream:
            for token in stream:
                if callback(token.text) is False:
                    break
        return stream

    def chat_stream(self, messages: list[dict], config: StreamConfig | int | None = None, *,
                    max_tokens: int | None = None, **options: Any) -> TokenStream:
        """Stream the assistant's reply to ``messages``, rendered with the model's own chat template."""
        config = resolve_config(config, max_tokens, options)
        prompt = self.model.apply_chat_template(messages, add_generation_prompt=True)
        return TokenStream(self, self._tokenize_prompt(prompt), config)

    def generate(self, prompt: str, max_tokens: int | None = None, *, config: StreamConfig | None = None,
                 **options: Any) -> Completion:
        """Complete ``prompt`` and return the whole result (greedy unless told otherwise)."""
        if config is None and "temperature" not in options:
            options["temperature"] = 0.0
        stream = self.generate_stream(prompt, config, max_tokens=max_tokens, **options)
        started = time.perf_counter()
        with stream:
            for _ in stream:
                pass
        return Completion(
            text=stream.text,
            token_ids=stream.token_ids,
            finish_reason=stream.finish_reason,
            prompt_tokens=stream.prompt_tokens,
            cached_tokens=stream.cached_tokens,
            timings={"prompt_seconds": stream.prompt_seconds(), "total_seconds": time.perf_counter() - started,
                     "time_to_first_token": stream.time_to_first_token(),
                     "tokens_per_second": stream.tokens_per_second()},
        )

    def close(self) -> None:
        """Free the KV cache and the context. Refused while another thread uses it."""
        if not self._guard.acquire(blocking=False):
            raise ContextError("this context is in use by another thread; stop its generation first.")
        try:
            super().close()
        finally:
            self._guard.release()

    def __repr__(self) -> str:
        return f"<mullama.Context n_ctx={self.n_ctx} cached={len(self._tokens)}{' closed' if self.closed else ''}>"


class _Exclusive:
    """Marks a Context busy for one step; a second thread gets a clear error, not corrupted state."""

    __slots__ = ("_context",)

    def __init__(self, context: Context) -> None:
        self._context = context

    def __enter__(self) -> None:
        self._context._enter_step()

    def __exit__(self, *exc_info: object) -> None:
        self._context._guard.release()
