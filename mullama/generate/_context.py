"""A llama.cpp context: the KV cache of one conversation, and the token loop on top of it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from collections.abc import Sequence as Seq
from contextlib import contextmanager
from typing import Any

from .._exceptions import (
    ContextError,
    ContextOverflowError,
    InvalidConfigError,
    StateModelMismatchError,
    decode_error,
    detached,
)
from ..native._owned import Owned
from . import _arguments, _state
from ._abort import PromptAbort
from ._batch import TokenBatch
from ._chat_turn import chat_turn, turn_tokens
from ._completion import Completion, greedy_unless_told
from ._config import StreamConfig, resolve_config
from ._context_params import (
    ContextSettings,
    adopt_context,
    check_n_ctx,
    chunk_end,
    create_context,
    default_threads,
    prompt_breaks,
    reusable_prefix,
    trim_cache,
)
from ._draft_model import DraftModelDrafter, check_draft_model, no_draft_model_error
from ._infill import infill_prompt
from ._lora import LoraSet, LoraSpec, apply_lora, describe, lora_set
from ._media import MediaPrompt
from ._model import Model, tokenize_prompt
from ._positions import CachePositions
from ._sequence import Sequence, Token
from ._speculative import draft_token_cost
from ._stream import TokenStream

__all__ = ["Context", "default_threads"]


class Context(Owned):
    """One llama.cpp context over a :class:`Model`.

    It keeps its KV cache between calls and reuses the longest common token prefix
    with the previous prompt, so a follow-up turn only decodes what is new.
    ``seed`` seeds every stream on it whose StreamConfig sets none.
    A Context is used by one thread at a time; give each thread its own.
    """

    _kind = "context"

    def __init__(self, model: Model, *, n_ctx: int | None = None, n_batch: int = 2048,
                 n_threads: int | str | None = None, n_threads_batch: int | None = None,
                 seed: int | None = None, flash_attn: bool | None = None, warmup: bool = True,
                 draft_model: Model | None = None) -> None:
        if not isinstance(model, Model):
            raise InvalidConfigError(f"Context needs a mullama.Model, not {type(model).__name__}.")
        check_n_ctx(n_ctx)
        settings = ContextSettings(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                   n_threads_batch=n_threads_batch, flash_attn=flash_attn)
        _arguments.check_seed(seed)
        if draft_model is not None:  # checked before anything is made: a refused one leaves nothing open
            check_draft_model(model, draft_model)
        self.model = model  # keeps the model alive as long as this context
        self.seed = seed
        ptr = create_context(model, settings)
        self._record_step = adopt_context(self, model, ptr, settings, warmup=warmup)
        try:
            self._set_up(model, ptr, settings, n_batch, warmup, draft_model)
        except BaseException:
            super().close()  # the llama context (a traceback held by the caller would keep it, and its model, in use)
            raise

    def _set_up(self, model: Model, ptr: Any, settings: ContextSettings, n_batch: int, warmup: bool,
                draft_model: Model | None) -> None:
        """The rest of ``__init__``, once the llama context is ours."""
        library = model._library
        ffi, lib = library.ffi, library.lib
        self._compute = library.compute
        self._lock = library.compute.lock_for(model.offloaded)
        self._lib = lib
        self._memory = lib.llama_get_memory(ptr)
        self.n_ctx = lib.llama_n_ctx(ptr)
        self.n_batch = lib.llama_n_batch(ptr)
        self.n_threads = settings.threads
        self.flash_attn = settings.flash_attn  # as asked: None is upstream's "auto"
        self._tokens: list[int] = []  # what the KV cache holds, in order
        self._positions = CachePositions()  # where they sit, when an M-RoPE image moved them (see _positions)
        self._guard = threading.Lock()
        # One-token batch, built once: the loop rewrites _token_buf[0] and decodes (no allocation).
        self._token_buf = ffi.new("llama_token[1]")
        self._one_token_batch = lib.llama_batch_get_one(self._token_buf, 1)
        self._verify: TokenBatch | None = None  # for speculative decoding, made at its first use
        self._abort = PromptAbort(ffi, lib, ptr)
        self._generation = 0  # bumped by each generation; an older one then stops
        self._lora: LoraSet = ()  # the LoRA adapters applied, which the cache's tokens were decoded with
        self._lora_default = lora_set(model, None)  # the model's, until set_lora(); a config's lora overrides
        self._apply_lora(self._lora_default)
        self._draft: Context | None = None  # the draft model's context, for StreamConfig(speculative="draft")
        if draft_model is not None:
            self._draft = Context(draft_model, n_ctx=self.n_ctx, n_batch=n_batch, n_threads=settings.n_threads,
                                  n_threads_batch=settings.n_threads_batch, flash_attn=settings.flash_attn,
                                  warmup=warmup)
            self._draft._belong_to_another()

    # --- KV cache ---------------------------------------------------------------
    @property
    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values are in the cache, in order."""
        return list(self._tokens)

    def clear(self) -> None:
        """Forget everything: the next prompt is decoded from scratch."""
        with self._use():
            self._lib.llama_memory_clear(self._memory, True)
            self._forget_cache()

    def save_state(self, path: str | os.PathLike[str]) -> int:
        """Write the KV cache and its tokens to ``path`` (atomically: a temporary file renamed over
        it), with the model's fingerprint; ``load_state`` on a Context of the same model takes it
        back. Returns the bytes written."""
        return _state.write_atomically(_arguments.check_path("path", path), self.state_bytes())

    def state_bytes(self) -> bytes:
        """The KV cache and its tokens as bytes, in ``save_state``'s format."""
        with self._use():
            return _state.sequence_state(self.model, self.ptr, 0, list(self._tokens), self._lora, self._positions)

    def load_state(self, path: str | os.PathLike[str]) -> list[int]:
        """Replace the KV cache by the state ``save_state`` wrote to ``path``; a prompt that starts with
        its tokens then decodes only what follows. Returns the tokens restored. Raises a StateError
        (NOT_A_STATE_FILE, STATE_CORRUPT, STATE_MODEL_MISMATCH) or ContextOverflowError, leaving the
        cache as it was, when a check fails; StateError, leaving it empty, when llama.cpp refuses it."""
        data = _state.read_state_file(path, limit=(self.n_ctx + 1) << 20)
        return self.load_state_bytes(data, source=os.fspath(path))

    def load_state_bytes(self, data: bytes | bytearray | memoryview, *, source: str = "the data") -> list[int]:
        """``load_state`` from the bytes ``state_bytes`` returned. A state computed with LoRA adapters
        loads into a context that applies the same ones (``set_lora``), else StateModelMismatchError."""
        with self._use():
            tokens, state, lora = _state.unpack_state(data, self.model, n_ctx=self.n_ctx, source=source)
            if tokens and lora != self._lora_default:
                raise StateModelMismatchError(
                    f"{source} was computed with the LoRA adapters {describe(lora)}, but this context applies "
                    f"{describe(self._lora_default)}; call set_lora() with the state's adapters first.")
            self._generation += 1  # a stream still open on this context ends: its cache is gone
            self._forget_cache()
            self._apply_lora(lora)
            with self._lock:
                _state.set_sequence(self.model, self.ptr, 0, tokens, state, source=source)
            self._tokens = tokens
            return list(tokens)

    def set_lora(self, lora: LoraSpec | None) -> None:
        """Apply LoRA adapters to every later generation: ``{path_or_adapter_or_id: scale}`` (or a list of
        paths or (path, scale) pairs); adapters not named get scale 0, ``{}`` applies none, None the
        model's at their default scales. A path not loaded yet is loaded (``model.load_lora``). A change
        empties the cache (its keys and values were computed with the other adapters)."""
        adapters = lora_set(self.model, lora)
        with self._use():
            self._lora_default = adapters
            self._apply_lora(adapters)

    @property
    def lora(self) -> list[tuple[str, float]]:
        """The adapters applied to the next generation without a ``lora`` option: (path, scale) pairs."""
        return [(str(adapter.path), scale) for adapter, scale in self._lora_default]

    def _apply_lora(self, adapters: LoraSet) -> None:
        if adapters != self._lora:
            apply_lora(self.model, self.ptr, adapters)
            self._lib.llama_memory_clear(self._memory, True)
            self._forget_cache()
            self._lora = adapters

    def _forget_cache(self) -> None:
        """The KV cache was emptied: no tokens, no positions."""
        self._tokens = []
        self._positions.clear()

    @contextmanager
    def _use(self) -> Iterator[None]:
        """The Context busy for one step: a second thread gets a clear error, not corrupted state."""
        self._enter_step()
        try:
            yield
        finally:
            self._guard.release()

    # --- decoding ---------------------------------------------------------------
    def decode(self, tokens: list[int]) -> None:
        """Append ``tokens`` to the cache (logits of the last one are kept for sampling)."""
        tokens = self.model._check_tokens(tokens)
        with self._compute.busy(), self._use():
            self._decode(tokens)

    def _decode(self, tokens: list[int], deadline: float | None = None, breaks: tuple[int, ...] = (),
                score: Callable[[Any, int, int, int], None] | None = None) -> None:
        """Decode ``tokens`` after the cached ones, in batches of at most n_batch that also end at the
        absolute positions ``breaks`` (as llama-server's do); after an M-RoPE image, at the positions
        it leaves (llama.cpp would number them from the image's first position). ``score``: every row's
        logits are kept and given to it after each batch (Sequence.score_prompt)."""
        if not tokens:
            return
        if len(self._tokens) + len(tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"{len(tokens)} new tokens + {len(self._tokens)} cached do not fit in the context of "
                f"{self.n_ctx} tokens; shorten the prompt, clear() the context, or create it with a larger n_ctx."
            )
        ffi, lib, ptr, shift = self._ffi, self._lib, self.ptr, self._positions.shift
        with self._abort.until(deadline):
            start, offset = 0, len(self._tokens)
            while start < len(tokens):
                end = chunk_end(offset + start, self.n_batch, breaks) - offset
                chunk = tokens[start:end]
                array = ffi.new("llama_token[]", chunk)
                # NULL: llama.cpp numbers them after the last cell's position, which after an M-RoPE image is
                # its first one: the shift names where they go (llama-server's pos_next)
                first = offset + start + shift
                pos = ffi.new("llama_pos[]", list(range(first, first + len(chunk)))) if shift else ffi.NULL
                # logits of the last token only, not of each chunk's last (a 262k-word vocabulary's cost them)
                outputs = ffi.NULL if end >= len(tokens) else ffi.new("int8_t[]", len(chunk))
                if score is not None:
                    outputs = ffi.new("int8_t[]", [1] * len(chunk))
                batch = lib.llama_batch_get_one(array, len(chunk))
                batch.pos, batch.logits = pos, outputs
                start = end
                with self._lock:
                    rc = lib.llama_decode(ptr, batch)
                self._check_decode(rc, len(self._tokens), 0)
                if score is not None:
                    with self._lock:
                        score(ptr, 0, len(self._tokens), len(chunk))
                self._tokens.extend(chunk)

    def _check_decode(self, rc: int, keep: int, processed: int) -> None:
        self.model._relays.check(self._lib, self.ptr)  # after any decode of a model on RPC servers: one may be lost
        if rc:  # a failed or aborted decode may leave finished chunks in the cache: drop them
            self._lib.llama_memory_seq_rm(self._memory, 0, keep + self._positions.shift, -1)
            raise decode_error(rc, n_ctx=self.n_ctx, processed=processed)

    def _prepare_prompt(self, prompt_tokens: list[int], deadline: float | None = None, *,
                        reuse: bool = True, score: Callable[[Any, int, int, int], None] | None = None) -> int:
        """Make the cache hold exactly ``prompt_tokens``, decoding only what differs (everything unless
        ``reuse``; ``score`` as for _decode). Returns how many prompt tokens were reused from the cache."""
        if not prompt_tokens:
            raise InvalidConfigError("the prompt is empty; give at least one token of text.")
        if len(prompt_tokens) > self.n_ctx:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_tokens)} tokens but the context holds {self.n_ctx}; "
                "shorten the prompt or create the Context with a larger n_ctx."
            )
        # Logits are only there for the last decoded token: re-decode at least one.
        common = trim_cache(self._lib, self._memory, 0, self._tokens,
                            reusable_prefix(self._tokens, prompt_tokens, reuse), self._positions)
        self._decode(prompt_tokens[common:], deadline, prompt_breaks(self.model, len(prompt_tokens), self.n_batch),
                     score)
        return common

    def _sequence(self, prompt_tokens: list[int], config: StreamConfig, media: MediaPrompt | None = None) -> Sequence:
        """A new sequence for ``prompt_tokens`` on this context (its sampler seeded by ``seed``)."""
        if not prompt_tokens:
            raise InvalidConfigError("the prompt is empty; give at least one token of text.")
        if config.lora is not None:
            lora_set(self.model, config.lora)  # a bad one fails now, not at the first step
        if (config.speculative is not None or config.drafts_ngrams) and config.draft_max + 1 > self.n_batch:
            raise InvalidConfigError(f"StreamConfig.draft_max ({config.draft_max}) and the token before the draft "
                                     f"must fit in one batch of this Context (n_batch={self.n_batch}); lower "
                                     "draft_max or create the Context with a larger n_batch.")
        if config.speculative == "draft" and self._draft is None:
            raise no_draft_model_error()
        sequence = Sequence(self.model, prompt_tokens, config, n_ctx=self.n_ctx, default_seed=self.seed, media=media,
                            draft_token_cost=draft_token_cost(self.flash_attn))
        if config.speculative == "draft" and self._draft is not None and media is None:  # see _draft_model
            sequence.drafter = DraftModelDrafter(self._draft, config.draft_max)
        return sequence

    def _steps(self, sequence: Sequence) -> Generator[Token, None, None]:
        """Step ``sequence`` on this context: decode its prompt, then one step per token, under the
        guard once: decode the token handed out last (the first step has the prompt's logits), then
        sample and accept the next. Closing the generator stops at once and leaves the cache
        consistent; starting another generation on this Context ends this one (its next step raises
        ContextError). One generator, no helpers per token: this is the hot loop."""
        try:
            with self._compute.busy():
                with self._use():
                    self._generation += 1
                    generation = self._generation
                    sequence.begin()
                    lora = sequence.config.lora
                    self._apply_lora(self._lora_default if lora is None else lora_set(self.model, lora))
                    reuse, scores = sequence.reuses_cache, sequence.config.prompt_logprobs is not None
                    cached = (self._prepare_prompt(sequence.prompt_tokens, sequence.deadline, reuse=reuse,
                                                   score=sequence.score_prompt if scores else None)
                              if sequence.media is None else sequence.media.evaluate(self, sequence.deadline, reuse))
                    sequence.prompt_decoded(cached)
                if sequence.drafter is not None:
                    yield from self._speculative_steps(sequence, generation)
                    return
                lib, ptr, lock, guard, enter_step = self._lib, self.ptr, self._lock, self._guard, self._enter_step
                buf, batch, tokens, relays = self._token_buf, self._one_token_batch, self._tokens, self.model._relays
                next_token, deadline, monotonic = sequence.next_token, sequence.deadline, time.monotonic
                record, clock = self._record_step, time.perf_counter
                token: Token | None = None
                while True:
                    if not guard.acquire(False):
                        enter_step(generation)  # tries again, and raises if it must
                    elif self._ptr is None or generation != self._generation:
                        guard.release()
                        enter_step(generation)  # raises why the step cannot be taken
                    try:
                        with lock:
                            if token is not None:
                                buf[0] = token.id
                                started = clock()
                                rc = lib.llama_decode(ptr, batch)
                                if rc != 0 or relays:
                                    self._check_decode(rc, len(tokens), sequence.n_tokens)
                                if record is not None:
                                    record(clock() - started, 1)
                                tokens.append(token.id)
                            token = next_token(ptr, -1, None)
                    finally:
                        guard.release()
                    yield token
                    if token.finish_reason is not None or sequence.finish_reason == "cancelled":
                        return  # the end, or closed from another thread meanwhile (TokenStream.close)
                    if deadline is not None and monotonic() > deadline:
                        sequence.check_deadline()
        except GeneratorExit:
            sequence.cancel()
            raise
        except BaseException as exc:
            sequence.fail(detached(exc))  # the sequence keeps a copy: exc's traceback holds this frame
            raise
        finally:
            sequence.close()

    def _speculative_steps(self, sequence: Sequence, generation: int) -> Generator[Token, None, None]:
        """The rest of ``_steps`` with speculative decoding: each step decodes the token handed out
        last with a draft after it (logits for every row), lets the sequence accept the longest agreeing
        prefix, and drops the rejected cells from the cache; the tokens accepted are then handed out
        one by one (all sampled before the first is yielded, so the logits are read while they are ours)."""
        lib, ptr, lock, guard, enter_step = self._lib, self.ptr, self._lock, self._guard, self._enter_step
        tokens, memory, n_ctx, shift = self._tokens, self._memory, self.n_ctx, self._positions.shift
        capacity = sequence.config.draft_max + 1
        if self._verify is None or self._verify.capacity < capacity:
            self._verify = TokenBatch(lib, capacity)
        verify, draft, check, deadline = self._verify, sequence.draft, sequence.verify, sequence.deadline
        last: Token | None = None
        while True:
            enter_step(generation)  # takes the guard, or raises why the step cannot be taken
            try:
                with lock:
                    if last is None:
                        out = [sequence.next_token(ptr, -1, None)]
                    else:
                        proposed = draft(tokens, last.id, n_ctx)
                        rc = verify.decode(ptr, verify.put_run(0, (last.id, *proposed), len(tokens) + shift, 0))
                        self._check_decode(rc, len(tokens), sequence.n_tokens)
                        out = check(ptr, 0, proposed)
                        tokens.append(last.id)
                        tokens.extend(proposed[:len(out) - 1])
                        if len(out) <= len(proposed):  # rejected cells: out of the cache
                            lib.llama_memory_seq_rm(memory, 0, len(tokens) + shift, -1)
            finally:
                guard.release()
            for last in out:  # (a finish among them is the sequence's already: only a cancel ends them early)
                yield last
                if last.finish_reason is not None or sequence.finish_reason == "cancelled":
                    return
            if deadline is not None and time.monotonic() > deadline:
                sequence.check_deadline()

    def _enter_step(self, generation: int | None = None) -> None:
        """Take the context for one step (of ``generation``, when given); release ``_guard`` after it.

        Another thread using it, a closed context, or a newer generation each raise a clear error.
        """
        if not self._guard.acquire(False):
            raise ContextError("this Context is being used by another thread at the same time; "
                               "give each thread its own Context (they can share one Model).")
        if self._ptr is None or (generation is not None and generation != self._generation):
            self._guard.release()
            self.ensure_open()  # raises the ClosedError that says why
            raise ContextError("another generation started on this Context, which ends this one; "
                               "use one Context per concurrent stream.")

    # --- the public streaming API -------------------------------------------------
    def generate_stream(self, prompt: str, config: StreamConfig | int | None = None, *,
                        max_tokens: int | None = None, **options: Any) -> TokenStream:
        """Stream the completion of ``prompt``, token by token.

        Call it as ``generate_stream(prompt, config=StreamConfig(...))``,
        ``generate_stream(prompt, 500)`` or ``generate_stream(prompt, max_tokens=500,
        temperature=0)`` (keyword options override fields of ``config``).
        """
        config = resolve_config(config, max_tokens, options)
        return self._stream(tokenize_prompt(self.model, prompt), config=config)

    def _stream(self, prompt_tokens: list[int], media: MediaPrompt | None = None, *,
                config: StreamConfig) -> TokenStream:
        sequence = self._sequence(prompt_tokens, config, media)
        return TokenStream(self._steps(sequence), sequence)

    def generate_streaming(self, prompt: str, max_tokens: int | None = None,
                           callback: Callable[[str], bool | None] | None = None, *,
                           config: StreamConfig | None = None, **options: Any) -> TokenStream:
        """Call ``callback(text)`` for every token's text; returning False stops generation.

        Returns the finished TokenStream, for its statistics.
        """
        if callback is None or not callable(callback):
            raise InvalidConfigError("generate_streaming needs a callback(text) -> bool.")
        with self.generate_stream(prompt, config, max_tokens=max_tokens, **options) as stream:
            for token in stream:
                if callback(token.text) is False:
                    break
        return stream

    def chat_stream(self, messages: list[dict[str, Any]], config: StreamConfig | int | None = None, *,
                    max_tokens: int | None = None, tools: list[dict[str, Any]] | None = None, tool_choice: Any = "auto",
                    parallel_tool_calls: bool = True, chat_template: str | os.PathLike[str] | None = None,
                    chat_template_kwargs: dict[str, Any] | None = None, reasoning_format: str = "auto",
                    **options: Any) -> TokenStream:
        """Stream the assistant's reply to ``messages``, rendered with the model's own chat template
        (or ``chat_template``, Jinja text or a file; ``chat_template_kwargs`` reach it).

        With ``tools`` (OpenAI's function tools) the model may call them: a call's tokens come with
        ``kind == "tool_call"`` and no text, the calls are in ``stream.tool_calls`` afterwards, and
        ``finish_reason`` is ``"tool_calls"``. ``tool_choice`` is "auto", "none", "required" or
        ``{"type": "function", "function": {"name": ...}}`` (a call, to that function).

        With a thinking template (``<think>``), the thought is kept apart: its tokens have
        ``kind == "reasoning"`` and it is in ``stream.reasoning``, not ``stream.text``;
        ``reasoning_format="none"`` leaves it in the text. Images and audio parts (``image_url``,
        ``input_audio``) need a model loaded with a projector (``Model.load(..., mmproj=...)``).
        """
        config = resolve_config(config, max_tokens, options)
        prompt, config = chat_turn(self.model, messages, config, tools=tools, tool_choice=tool_choice,
                                   parallel_tool_calls=parallel_tool_calls, chat_template=chat_template,
                                   chat_template_kwargs=chat_template_kwargs, reasoning_format=reasoning_format)
        return self._stream(*turn_tokens(self.model, prompt), config=config)

    def infill(self, prefix: str | list[str | int], suffix: str | list[str | int],
               config: StreamConfig | int | None = None, *,
               max_tokens: int | None = None, prompt: str = "", extra: Seq[Mapping[str, Any]] = (),
               spm: bool = False, **options: Any) -> TokenStream:
        """Stream the middle between ``prefix`` and ``suffix`` (code completion at a cursor), for a model
        with FIM tokens (InvalidConfigError otherwise). The prompt is llama-server's ``/infill`` one:
        ``prompt`` starts the middle, ``extra`` chunks (``{"text", "filename"}``) are other files;
        ``prefix`` and ``suffix`` may also be lists of texts and token ids. ``spm`` puts the suffix
        first (llama-server's ``--spm-infill``, for models trained that way)."""
        config = resolve_config(config, max_tokens, options)
        tokens = infill_prompt(self.model, prefix, suffix, prompt=prompt, extra=extra, n_ctx=self.n_ctx,
                               n_batch=self.n_batch, spm=spm)
        return self._stream(tokens, config=config)

    def generate(self, prompt: str, max_tokens: int | None = None, *, config: StreamConfig | None = None,
                 **options: Any) -> Completion:
        """Complete ``prompt`` and return the whole result (greedy unless told otherwise)."""
        greedy_unless_told(config, options)
        started = time.perf_counter()
        stream = self.generate_stream(prompt, config, max_tokens=max_tokens, **options)
        with stream:
            for _ in stream:
                pass
        return Completion.from_stream(stream, time.perf_counter() - started)

    def close(self) -> None:
        """Free the KV cache and the context. Refused while another thread uses it."""
        if self._ptr is None:
            return
        if not self._guard.acquire(blocking=False):
            raise ContextError("this context is in use by another thread; stop its generation first.")
        try:
            super().close()
            for owned in (self._verify, self._draft):
                if owned is not None:
                    owned.close()
        finally:
            self._guard.release()

    def __repr__(self) -> str:
        return f"<mullama.Context n_ctx={self.n_ctx} cached={len(self._tokens)}{' closed' if self.closed else ''}>"
