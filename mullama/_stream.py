"""TokenStream: a plain iterator of tokens, with statistics, that stops when you stop."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._config import StreamConfig
from ._sampler import SamplerChain
from ._text import TextAssembler

if TYPE_CHECKING:
    from ._context import Context

__all__ = ["Token", "TokenStream"]


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token.

    ``text`` is what this token adds to the visible output: it may be "" while a
    multi-byte character or a possible stop sequence is still incomplete, and it may
    carry text held back from earlier tokens. Joining every ``text`` of a stream gives
    exactly the completion. The last token of a finished stream has ``finish_reason``
    set ("stop" or "length"); an end-of-generation token is yielded like upstream counts
    it, with no text of its own.
    """

    id: int
    text: str
    index: int
    finish_reason: str | None = None


def sampler_for(config: StreamConfig, n_vocab: int) -> SamplerChain:
    """The llama.cpp sampler chain that ``config`` describes."""
    if config.greedy:
        return SamplerChain.greedy()
    return SamplerChain.sampling(
        n_vocab=n_vocab, temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
        min_p=config.min_p, repeat_penalty=config.repeat_penalty, repeat_last_n=config.repeat_last_n,
        frequency_penalty=config.frequency_penalty, presence_penalty=config.presence_penalty, seed=config.seed,
    )


class _Stats:
    __slots__ = (
        "finish_reason",
        "first_token",
        "last_token",
        "loop",
        "n_tokens",
        "started",
        "stop_sequence",
        "text_parts",
        "token_ids",
    )

    def __init__(self) -> None:
        self.started = self.first_token = self.last_token = None
        self.n_tokens = 0
        self.finish_reason: str | None = None
        self.loop: dict = {}
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.stop_sequence: str | None = None


def _run(context: Context, prompt_tokens: list[int], config: StreamConfig, stats: _Stats) -> Iterator[Token]:
    """The stream's generator. It never references the TokenStream, so dropping the stream
    drops (and closes) it."""
    stats.started = time.perf_counter()
    deadline = time.monotonic() + config.timeout_ms / 1000 if config.timeout_ms else None
    model = context.model
    sampler = sampler_for(config, model.vocab_size)
    assembler = TextAssembler(config.stop_sequences)
    piece = model._cached_piece
    loop = stats.loop
    ids = context.generate_token_ids(prompt_tokens, sampler, config.max_tokens, deadline=deadline, stats=loop,
                                     ignore_eos=config.ignore_eos)
    append_text, append_id, perf_counter = stats.text_parts.append, stats.token_ids.append, time.perf_counter
    try:
        for index, token_id in enumerate(ids):
            now = perf_counter()
            if stats.first_token is None:
                stats.first_token = now
            stats.last_token = now
            text, finish = assembler.add(piece(token_id), loop["finish_reason"])
            stats.n_tokens += 1
            append_id(token_id)
            if text:
                append_text(text)
            if finish is not None:
                stats.finish_reason, stats.stop_sequence = finish, assembler.stop_sequence
                yield Token(token_id, text, index, finish)
                return
            yield Token(token_id, text, index)
    finally:
        ids.close()
        sampler.close()


class TokenStream:
    """Tokens of one generation, as they are produced.

    Iterate it (``for token in stream``), use it as a context manager, or ``close()``
    it: generation only advances when you ask for the next token, so breaking out of a
    loop, closing, or dropping the stream stops decoding at once and leaves the Context
    ready for the next call. Statistics are available during and after the stream.
    """

    def __init__(self, context: Context, prompt_tokens: list[int], config: StreamConfig) -> None:
        self.config = config
        self.prompt_tokens = len(prompt_tokens)
        self._stats = _Stats()
        self._iterator = _run(context, prompt_tokens, config, self._stats)
        self._closed = False

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> Token:
        try:
            return next(self._iterator)
        except StopIteration:
            self._closed = True
            raise
        except BaseException:
            self._closed = True
            if self._stats.finish_reason is None:
                self._stats.finish_reason = "error"
            raise

    def close(self) -> None:
        """Stop generating now. Idempotent."""
        if not self._closed:
            self._closed = True
            self._iterator.close()
            if self._stats.finish_reason is None:
                self._stats.finish_reason = "cancelled"

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # --- statistics -----------------------------------------------------------
    @property
    def finish_reason(self) -> str | None:
        """"stop" (end of generation or a stop sequence), "length" (max_tokens or a full context),
        "cancelled" (closed early), "error", or None while running."""
        return self._stats.finish_reason

    @property
    def stop_sequence(self) -> str | None:
        """The stop sequence that ended the stream, if one did."""
        return self._stats.stop_sequence

    @property
    def text(self) -> str:
        """All text produced so far (the join of every token's ``text``)."""
        return "".join(self._stats.text_parts)

    @property
    def token_ids(self) -> list[int]:
        return list(self._stats.token_ids)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens reused from the Context's cache instead of decoded again."""
        return self._stats.loop.get("cached_tokens", 0)

    def tokens_generated(self) -> int:
        """Tokens produced so far (an end-of-generation token counts, as upstream counts it)."""
        return self._stats.n_tokens

    def time_to_first_token(self) -> float | None:
        """Seconds from the start of generation (prompt processing included) to the first token."""
        stats = self._stats
        return None if stats.first_token is None else stats.first_token - stats.started

    def tokens_per_second(self) -> float:
        """Generation speed: tokens after the first, over the time since the first (0.0 before two tokens)."""
        stats = self._stats
        if stats.n_tokens < 2 or stats.last_token == stats.first_token:
            return 0.0
        return (stats.n_tokens - 1) / (stats.last_token - stats.first_token)

    def prompt_seconds(self) -> float | None:
        """Seconds spent decoding the prompt (only the part not reused from the cache)."""
        return self._stats.loop.get("prompt_seconds")

    def __repr__(self) -> str:
        return (f"<mullama.TokenStream tokens={self.tokens_generated()} "
                f"finish_reason={self.finish_reason!r}>")
