"""One generated sequence: the single place that decides what a sampled token means.

A :class:`Sequence` holds everything about one generation except the KV cache: its
sampler chain, the text assembly (UTF-8 and stop sequences), its limits and deadline,
its statistics and its finish reason. Whoever decodes — a :class:`~mullama.Context`
stepping one sequence, or the batching engine stepping many in one ``llama_decode`` —
asks it to ``sample`` from a row of logits and gets back the :class:`Token` to hand
out, with its finish reason when it is the last. Stop, length, end of generation and
timeouts are decided here and nowhere else, so a feature added here reaches the sync
stream, the async stream and the server alike.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .._exceptions import InvalidConfigError, StreamTimeoutError
from .._text import TextAssembler
from ..chat._reasoning import ReasoningParser
from ..chat._tools import ToolCall, ToolCallParser
from ..structured._response_format import JsonFence
from ._logprobs import TopLogprob, token_logprobs
from ._sampler import SamplerChain
from ._speculative import FLASH_DRAFT_TOKEN_COST, Drafter, NgramDrafter

if TYPE_CHECKING:
    from ._config import StreamConfig
    from ._media import MediaPrompt
    from ._model import Model

__all__ = ["Sequence", "SequenceView", "Token"]


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token.

    ``text`` is what this token adds to the visible output: it may be "" while a
    multi-byte character or a possible stop sequence is still incomplete, and it may
    carry text held back from earlier tokens. Joining every ``text`` of a stream gives
    exactly the completion. In a chat with a thinking template or tools, ``kind`` says
    which part a token belongs to: the content, the reasoning (``text`` is thought), or a
    tool call (no text); the content alone is the stream's ``text``. The last token of a
    finished stream has ``finish_reason`` set ("stop", "length", or "tool_calls"); an
    end-of-generation token is yielded like upstream counts it, with no text of its own.
    """

    id: int
    text: str
    index: int
    finish_reason: str | None = None
    logprob: float | None = None  # with StreamConfig(logprobs=K): log-probability of this token
    top_logprobs: tuple[TopLogprob, ...] = ()  # ... and the K most likely tokens at this step
    kind: str = "content"  # "reasoning": text is thought; "tool_call": written inside a tool call (text "")


def _token_constructor() -> Callable[[int, str, int, str | None, float | None, tuple[TopLogprob, ...], str], Token]:
    """``Token(...)`` with every field given, at a third of the dataclass __init__'s cost: a frozen
    dataclass sets each field through object.__setattr__; this sets its slots directly."""
    new = object.__new__
    set_id, set_text, set_index, set_finish, set_logprob, set_top, set_kind = (
        getattr(Token, name).__set__ for name in ("id", "text", "index", "finish_reason", "logprob", "top_logprobs",
                                                  "kind"))

    def token(id: int, text: str, index: int, finish_reason: str | None, logprob: float | None,
              top_logprobs: tuple[TopLogprob, ...], kind: str) -> Token:
        made = new(Token)
        set_id(made, id)
        set_text(made, text)
        set_index(made, index)
        set_finish(made, finish_reason)
        set_logprob(made, logprob)
        set_top(made, top_logprobs)
        set_kind(made, kind)
        return made

    return token


new_token = _token_constructor()


def _piece_texts(piece: Callable[[int], bytes], tokens: list[int]) -> list[str]:
    """Each token's text as a UTF-8 decoder reads the pieces in order: a character split across tokens
    comes with the token that completes it, so the texts join to the whole text."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    texts = [decoder.decode(piece(token)) for token in tokens]
    texts[-1] += decoder.decode(b"", True)
    return texts


class Sequence:
    """The state of one generation, from its prompt to its finish.

    ``n_ctx`` is the room the sequence has in its context: the prompt and the generated
    tokens together never need more (the last token produced is never decoded).
    """

    __slots__ = (
        "_info",
        "_infos",
        "_model",
        "_n_vocab",
        "_parsed",
        "_piece",
        "_prompt_texts",
        "assembler",
        "cached_tokens",
        "config",
        "deadline",
        "draft_accepted",
        "draft_proposed",
        "drafter",
        "error",
        "fence",
        "finish_reason",
        "first_token",
        "ignore_eos",
        "last_token",
        "limit",
        "media",
        "n_logprobs",
        "n_tokens",
        "prompt_done",
        "prompt_tokens",
        "sampler",
        "scored_prompt",
        "started",
        "stop_sequence",
        "text_parts",
        "thinking",
        "thought_parts",
        "token_ids",
        "tools",
    )

    def __init__(self, model: Model, prompt_tokens: list[int], config: StreamConfig, *, n_ctx: int,
                 default_seed: int | None = None, media: MediaPrompt | None = None,
                 draft_token_cost: float = FLASH_DRAFT_TOKEN_COST) -> None:
        if config.top_k > model.vocab_size:
            raise InvalidConfigError(f"StreamConfig.top_k must be at most the vocabulary size "
                                     f"({model.vocab_size}), not {config.top_k}.", field="top_k")
        if config.repeat_last_n > n_ctx:
            raise InvalidConfigError(f"StreamConfig.repeat_last_n must be at most the context size ({n_ctx}), "
                                     f"not {config.repeat_last_n}.", field="repeat_last_n")
        if config.prompt_logprobs is not None and media is not None:
            raise InvalidConfigError("StreamConfig.prompt_logprobs scores a prompt of text; this one holds images or "
                                     "audio.", field="prompt_logprobs")
        self.prompt_tokens = prompt_tokens
        self.scored_prompt: list[Token] = []  # with prompt_logprobs: each prompt token, scored once decoded
        self.media = media  # a prompt with images or audio: evaluated by it (_media.py), not decoded as tokens
        self.config = config
        self.limit = min(config.max_tokens, n_ctx - len(prompt_tokens))
        self.ignore_eos = config.ignore_eos
        self.sampler = SamplerChain.for_config(config, model, n_ctx=n_ctx, default_seed=default_seed)
        self.sampler.accept_prompt(prompt_tokens if media is None else media.text_tokens)
        self.assembler = TextAssembler(config.stop_sequences)
        self.tools = ToolCallParser(config.tool_calls.format) if config.tool_calls is not None else None
        self.thinking = ReasoningParser(config.reasoning) if config.reasoning is not None else None
        self.fence = JsonFence() if config.fenced_json and self.tools is None else None
        self.thought_parts: list[str] = []
        self._piece = model._cached_piece
        self._info = model._token_info
        self._infos = model._pieces  # _info's cache, read first: a hit costs no call
        self._parsed = self.thinking is not None or self.fence is not None or self.tools is not None
        self._model = model
        self._n_vocab = model.vocab_size
        self.n_logprobs = config.logprobs
        self.started: float | None = None
        self.deadline: float | None = None
        self.prompt_done: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.n_tokens = 0
        self.cached_tokens = 0
        self.token_ids: list[int] = []
        self.text_parts: list[str] = []
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        self.error: BaseException | None = None
        # Speculative decoding: who drafts (a draft model's drafter is set by Context and Engine), and how
        # many drafted tokens were proposed and accepted.
        self.drafter: Drafter | None = None
        if config.drafts_ngrams:
            predicted = (model.tokenize(config.prediction, add_special=False, parse_special=False)
                         if config.prediction else [])
            self.drafter = NgramDrafter(config.draft_min, config.draft_max, sized=config.speculative != "ngram-simple",
                                        token_cost=draft_token_cost, reference=predicted)
        self.draft_proposed = 0
        self.draft_accepted = 0

    # --- the steps ------------------------------------------------------------------
    def begin(self) -> None:
        """The request for tokens is made now: time to first token and the timeout count from here."""
        self.started = time.perf_counter()
        timeout = self.config.timeout_ms
        self.deadline = time.monotonic() + timeout / 1000 if timeout else None

    @property
    def reuses_cache(self) -> bool:
        """Whether the prompt may be taken from the KV cache (no rows of logits for what is taken)."""
        return self.config.cache_prompt and self.config.prompt_logprobs is None

    def score_prompt(self, ctx: Any, first_row: int, position: int, n: int) -> None:
        """Rows ``first_row``... of ``ctx``'s logits are those of prompt positions ``position``...: each
        scores the prompt token after it (StreamConfig.prompt_logprobs). The first prompt token, which
        nothing scores, comes first with no logprob; texts join to the prompt's as a decoder reads them."""
        prompt, scored = self.prompt_tokens, self.scored_prompt
        if not scored:
            self._prompt_texts = texts = _piece_texts(self._piece, prompt)
            scored.append(new_token(prompt[0], texts[0], 0, None, None, (), "prompt"))
        for row in range(first_row, first_row + n):
            position += 1
            if position >= len(prompt):
                break
            logprob, top = self._logprobs(ctx, row, prompt[position], self.config.prompt_logprobs or 0)
            scored.append(new_token(prompt[position], self._prompt_texts[position], position, None, logprob, top,
                                    "prompt"))

    def prompt_decoded(self, cached_tokens: int) -> None:
        """The prompt is in the KV cache (``cached_tokens`` of it were reused, not decoded)."""
        self.prompt_done = time.perf_counter()
        self.cached_tokens = cached_tokens

    def next_token(self, ctx: Any, row: int, lock: AbstractContextManager[Any] | None) -> Token:
        """Sample from row ``row`` of ``ctx``'s logits (under ``lock``: sampling takes the cores, so not
        beside another context's decode; None when the caller holds it) and accept the token: the
        step every decoder takes."""
        if lock is None:
            token_id = self.sampler.sample(ctx, row)
        else:
            with lock:
                token_id = self.sampler.sample(ctx, row)
        return self.accept(token_id, ctx, row)

    def draft(self, cached: list[int], sampled: int, n_ctx: int) -> list[int]:
        """The draft to verify with ``sampled`` (the token about to be decoded after ``cached``, the
        tokens in this sequence's cache): llama-server's room, at most n_ctx - cached - 2 tokens and
        one less than the tokens still allowed."""
        assert self.drafter is not None
        return self.drafter.draft(cached, sampled, min(n_ctx - len(cached) - 2, self.limit - self.n_tokens - 1))

    def verify(self, ctx: Any, first_row: int, draft: list[int]) -> list[Token]:
        """Sample rows ``first_row``... of ``ctx``'s logits (the sampled token's, then one per drafted
        token; the caller holds the compute lock) and accept while the sample equals the draft:
        upstream's ``common_sampler_sample_and_accept_n``. Returns the tokens to hand out, at least
        one; the last may end the sequence. A draft token the grammar or sampler would not pick is
        simply where the draft stops."""
        next_token = self.next_token
        out: list[Token] = []
        accepted = proposed = len(draft)
        for i in range(proposed):
            token = next_token(ctx, first_row + i, None)
            out.append(token)
            if token.id != draft[i]:
                accepted = i
                break
            if token.finish_reason is not None:
                # upstream takes a drafted end-of-generation token before the draft's last as sampled, not
                # accepted (its count; the tokens handed out are the same)
                eog = (self._infos.get(token.id) or self._info(token.id))[2]
                accepted = i if eog and i + 1 < proposed else i + 1
                break
        else:
            out.append(next_token(ctx, first_row + proposed, None))
        self.draft_proposed += proposed
        self.draft_accepted += accepted
        if self.drafter is not None:
            self.drafter.verified(proposed, accepted)
        return out

    def accept(self, token: int, ctx: Any = None, row: int = -1) -> Token:
        """Take a sampled token (from row ``row`` of the logits of ``ctx``): its text, and whether
        generation ends with it. Runs once per token: what most streams skip sits behind one test."""
        now = perf_counter()
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.n_tokens = n = self.n_tokens + 1
        self.token_ids.append(token)
        piece, whole_text, eog = self._infos.get(token) or self._info(token)
        if eog and not self.ignore_eos:
            finish: str | None = "stop"
        else:
            finish = "length" if n >= self.limit else None
        text, finish = self.assembler.add(piece, finish, whole_text)
        kind, shown = "content", text
        if self._parsed:
            text, shown, kind, finish = self._parse(text, finish)
        if text:
            self.text_parts.append(text)
        if finish is not None:
            self.finish_reason, self.stop_sequence = finish, self.assembler.stop_sequence
        n_logprobs = self.n_logprobs
        if n_logprobs is None or ctx is None:
            return new_token(token, shown, n - 1, finish, None, (), kind)
        logprob, top = self._logprobs(ctx, row, token, n_logprobs)
        return new_token(token, shown, n - 1, finish, logprob, top, kind)

    def _parse(self, text: str, finish: str | None) -> tuple[str, str, str, str | None]:
        """Reasoning, a JSON fence and tool calls taken out of the text: the content, the text to
        show (the thought when the token is reasoning), the token's kind, and the finish."""
        kind, shown = "content", None
        if self.thinking is not None:
            text, thought = self._split_thought(text, finish)
            if thought and not text:
                kind, shown = "reasoning", thought
        if self.fence is not None:
            text = self.fence.feed(text) + (self.fence.finish() if finish is not None else "")
        if self.tools is not None:
            text, call_kind, finish = self._split_calls(text, finish)
            kind = call_kind if call_kind == "tool_call" else kind
        return text, text if shown is None else shown, kind, finish

    def _split_thought(self, text: str, finish: str | None) -> tuple[str, str]:
        """The content and the reasoning this token releases (see mullama.chat._reasoning)."""
        thinking = self.thinking
        assert thinking is not None
        content, thought = thinking.feed(text)
        if finish is not None:
            more_content, more_thought = thinking.finish()
            content, thought = content + more_content, thought + more_thought
        if thought:
            self.thought_parts.append(thought)
        return content, thought

    def _split_calls(self, text: str, finish: str | None) -> tuple[str, str, str | None]:
        """Content and tool calls apart: the content this token releases, its kind, and the finish
        ("tool_calls" when the model ended after calling tools)."""
        tools = self.tools
        assert tools is not None
        was_in_call, calls_before = tools.in_call, len(tools.calls)
        content, in_call = tools.feed(text)
        if finish is not None:
            content += tools.finish()
            if finish == "stop" and tools.calls:
                finish = "tool_calls"
        touched = was_in_call or in_call or len(tools.calls) != calls_before
        return content, "tool_call" if touched and not content else "content", finish

    def _logprobs(self, ctx: Any, row: int, token: int, k: int) -> tuple[float, tuple[TopLogprob, ...]]:
        lib, ffi = self._model._library.lib, self._model._library.ffi
        logits = lib.llama_get_logits_ith(ctx, row)
        chosen, top = token_logprobs(ffi, logits, self._n_vocab, token, k)
        piece = self._piece
        return chosen, tuple(TopLogprob(i, piece(i).decode("utf-8", "replace"), lp, piece(i)) for i, lp in top)

    def check_deadline(self) -> None:
        """Raise StreamTimeoutError once the sequence has run past its timeout."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise StreamTimeoutError(f"generation timed out after {self.n_tokens} tokens; raise timeout_ms "
                                     "or lower max_tokens.")

    def fail(self, error: BaseException) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self.error = error

    def cancel(self) -> None:
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def close(self) -> None:
        """Free the sampler chain (statistics stay readable)."""
        self.sampler.close()
        if self.drafter is not None:
            self.drafter.close()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


class SequenceView:
    """Statistics of a stream, read from its :class:`Sequence` (shared by every stream type)."""

    _sequence: Sequence | None

    @property
    def finish_reason(self) -> str | None:
        """"stop" (end of generation or a stop sequence), "length" (max_tokens or a full context),
        "cancelled" (closed early), "error", or None while running."""
        return self._sequence.finish_reason if self._sequence else None

    @property
    def stop_sequence(self) -> str | None:
        """The stop sequence that ended the stream, if one did."""
        return self._sequence.stop_sequence if self._sequence else None

    @property
    def text(self) -> str:
        """All text produced so far (the join of every token's ``text``; with tools, the content
        without the calls)."""
        return self._sequence.text if self._sequence else ""

    @property
    def reasoning(self) -> str:
        """The model's thought (``<think>…</think>``), kept apart from ``text`` for thinking templates."""
        return "".join(self._sequence.thought_parts) if self._sequence else ""

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls the model made (with ``chat_stream(tools=...)``), complete ones only."""
        tools = self._sequence.tools if self._sequence else None
        return list(tools.calls) if tools is not None else []

    @property
    def token_ids(self) -> list[int]:
        return list(self._sequence.token_ids) if self._sequence else []

    @property
    def prompt_tokens(self) -> int:
        """How many tokens the prompt has."""
        return len(self._sequence.prompt_tokens) if self._sequence else 0

    @property
    def prompt_logprobs(self) -> list[Token]:
        """With ``StreamConfig(prompt_logprobs=K)``: every prompt token (``kind`` "prompt"), each after the
        first with its logprob given those before it and the K most likely there; once the prompt is decoded."""
        return list(self._sequence.scored_prompt) if self._sequence else []

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens reused from the KV cache instead of decoded again."""
        return self._sequence.cached_tokens if self._sequence else 0

    @property
    def draft_proposed(self) -> int:
        """Drafted tokens sent for verification (speculative decoding)."""
        return self._sequence.draft_proposed if self._sequence else 0

    @property
    def draft_accepted(self) -> int:
        """Drafted tokens the model agreed with: each saved one decode step."""
        return self._sequence.draft_accepted if self._sequence else 0

    @property
    def completion_tokens(self) -> int:
        return self.tokens_generated()

    def tokens_generated(self) -> int:
        """Tokens produced so far (an end-of-generation token counts, as upstream counts it)."""
        return self._sequence.n_tokens if self._sequence else 0

    def time_to_first_token(self) -> float | None:
        """Seconds from the request (prompt processing and any wait for a slot included) to the first token."""
        seq = self._sequence
        if seq is None or seq.first_token is None or seq.started is None:
            return None
        return seq.first_token - seq.started

    def tokens_per_second(self) -> float:
        """Generation speed: tokens after the first, over the time since the first (0.0 before two tokens)."""
        seq = self._sequence
        if seq is None or seq.n_tokens < 2 or seq.first_token is None or seq.last_token == seq.first_token:
            return 0.0
        assert seq.last_token is not None
        return (seq.n_tokens - 1) / (seq.last_token - seq.first_token)

    def prompt_seconds(self) -> float | None:
        """Seconds from the request until the prompt was in the KV cache."""
        seq = self._sequence
        if seq is None or seq.prompt_done is None or seq.started is None:
            return None
        return seq.prompt_done - seq.started
