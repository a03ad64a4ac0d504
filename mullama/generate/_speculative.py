"""Speculative decoding: guess the next tokens cheaply, check them all in one ``llama_decode``.

A drafter proposes tokens that may come next; the decoder puts the token it has just sampled
and the draft into one batch with logits for every position; the sequence then samples row
after row with its own sampler (:meth:`Sequence.verify`) and keeps going while what it samples
equals the draft. Every token handed out is still the one the sampler picks from the model's
logits after exactly the tokens before it, so greedy output is the same with speculation on or
off (up to the last bits of a batched matrix product, see docs/speculative.md), and sampled
output follows the same distribution: this is upstream's acceptance rule
(``common_sampler_sample_and_accept_n``: sample at each drafted position, accept while the
sample equals the draft), not the probability-ratio rejection rule.

The drafter here is upstream's ``ngram-simple`` (``common/ngram-map.cpp``,
``common_ngram_simple_draft``) token for token: the last ``n`` tokens of the context, the
sampled token last, are looked up backwards in the context (prompt and output); the tokens
that followed the most recent earlier occurrence are the draft, at most ``m`` of them and at
least ``n``. ``StreamConfig.draft_min`` is its ``n`` (``--spec-ngram-simple-size-n``) and
``draft_max`` its ``m`` (``--spec-ngram-simple-size-m``). ``speculative="ngram-simple"`` drafts
that at every match, as upstream does (the same drafts proposed and accepted as llama-server's).
``speculative="ngram"`` finds the same drafts and sizes them (:class:`DraftLength`): each drafted
token makes the verify batch dearer (on a CPU by about half a one-token step with flash attention,
a quarter without: :func:`draft_token_cost`), so a draft is cut to the length that gives the most
tokens per unit of decode time at the acceptance seen so far (but where the text copies a long span,
the 20 tokens before the n-gram matching too, the draft is whole), and
after two drafts in a row of which nothing was accepted drafting pauses for 2, 4, ... up to 64
tokens. Text that repeats what came before gets long drafts; text that never repeats itself pays
for almost no verify batches. The context searched is its text: the positions of an
image or audio clip (negative placeholders in the cache's list) are left out, as llama-server's
``server_tokens::get_text_tokens`` leaves them out, so a draft never holds one.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["BACKOFF_MAX", "LONG_MATCH", "DraftLength", "Drafter", "NgramDrafter", "draft_token_cost"]

BACKOFF_MAX = 64  # tokens: the longest pause in drafting after rejected drafts
# What one more drafted token adds to a verify batch, as a share of a one-token decode, by attention
# path. Measured with llama-bench (pp2 ... pp17 against tg) on 2 CPU cores, SmolLM2 Q4_1: with flash
# attention every row of the batch reads the whole cache on its own, so a drafted token costs a third
# of a step in an empty context and half a step after 500 tokens (a 17-token batch: 6.0 and 8.6
# steps); without it the batch attends as one matrix product and a drafted token costs 0.28 of a
# step at either depth (a 17-token batch: 5.5 steps at both).
FLASH_DRAFT_TOKEN_COST = 0.5
PLAIN_DRAFT_TOKEN_COST = 0.28
ACCEPT_PRIOR = 0.9  # the chance a drafted token is accepted, believed before any draft was verified
PRIOR_WEIGHT = 2.0  # ... as strongly as this many drafted tokens verified
MEMORY = 0.8  # each verified draft keeps this share of what the ones before it taught
# Tokens before the n-gram that must match too for a full-length draft whatever the sizing says. Measured
# on 2 cores of an AMD EPYC, SmolLM2, benchmarks/bench_speculative.py's prompts, 5 rounds: the geometric
# mean over its grounded prompts went from 1.43x plain to 1.47x without flash attention, 1.16x to 1.21x
# with it (12 gained more where the answer copies, but cost 11% on "summarise").
LONG_MATCH = 20


def draft_token_cost(flash_attn: bool | None) -> float:
    """The cost of one more drafted token in a verify batch, in one-token steps, for a context made
    with ``flash_attn`` (None is upstream's "auto", which turns flash attention on wherever the device
    runs it, as a CPU does)."""
    return PLAIN_DRAFT_TOKEN_COST if flash_attn is False else FLASH_DRAFT_TOKEN_COST


class Drafter(Protocol):
    """What proposes drafts: the n-gram lookup below, or a draft model (mullama.generate._draft_model)."""

    def draft(self, history: list[int], sampled: int, room: int) -> list[int]: ...

    def verified(self, proposed: int, accepted: int) -> None: ...

    def close(self) -> None: ...


class DraftLength:
    """How long a draft to verify, from how drafts have fared: ``speculative="ngram"``'s sizing.

    Each drafted token is taken to be accepted with one chance ``q`` once the tokens before it were
    (estimated from the drafts verified so far, recent ones counting most), so a draft of ``k``
    tokens yields ``1 + q + ... + q**k`` tokens for a decode costing ``1 + token_cost * k``
    one-token steps (:func:`draft_token_cost`); the length with the most tokens per step is chosen,
    at least one token (a draft is how ``q`` is learnt). After two drafts in a row of which nothing
    was accepted, drafting pauses for 2, 4, 8, ... up to ``BACKOFF_MAX`` opportunities; an accepted
    token ends the pauses. The choice depends only on the tokens and the context's settings, never
    on a clock, so the same prompt gives the same batches."""

    __slots__ = ("accepted", "failures", "token_cost", "tried", "wait")

    def __init__(self, token_cost: float = FLASH_DRAFT_TOKEN_COST) -> None:
        self.token_cost = token_cost  # what a drafted token adds to the verify batch, in one-token steps
        self.accepted = 0.0  # drafted tokens accepted, recent drafts weighing most
        self.tried = 0.0  # drafted tokens whose acceptance was decided (accepted, and the first rejected)
        self.failures = 0  # drafts in a row of which nothing was accepted
        self.wait = 0  # drafting opportunities still to skip

    def pausing(self) -> bool:
        """Whether to skip this opportunity to draft (counting it off the pause)."""
        if self.wait:
            self.wait -= 1
            return True
        return False

    def best(self, longest: int) -> int:
        """The draft length, 1 to ``longest``, with the most tokens per unit of decode time."""
        q = (self.accepted + ACCEPT_PRIOR * PRIOR_WEIGHT) / (self.tried + PRIOR_WEIGHT)
        best, best_rate, tokens, term, cost = 1, 0.0, 1.0, 1.0, self.token_cost
        for length in range(1, longest + 1):
            term *= q
            tokens += term
            rate = tokens / (1.0 + cost * length)
            if rate > best_rate:
                best, best_rate = length, rate
        return best

    def verified(self, proposed: int, accepted: int) -> None:
        """Learn from a verified draft of ``proposed`` tokens, ``accepted`` of them kept."""
        if not proposed:
            return
        self.accepted = self.accepted * MEMORY + accepted
        self.tried = self.tried * MEMORY + accepted + (accepted < proposed)
        if accepted:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= 2:
            self.wait = min(2 ** (self.failures - 1), BACKOFF_MAX)


def _copying(text: list[int], start: int, end: int) -> bool:
    """Whether the ``LONG_MATCH`` tokens before the n-gram at ``end`` equal those before its earlier
    occurrence at ``start``: the text is copying a long span, and goes on copying far more often than
    the acceptance seen so far says (a full draft then)."""
    if start < LONG_MATCH:
        return False
    return text[start - LONG_MATCH:start] == text[end - LONG_MATCH:end]


class NgramDrafter:
    """Drafts from the sequence's own context, as upstream's ngram-simple does; ``sized``: cut to a
    :class:`DraftLength` (``speculative="ngram"``). ``reference``: tokens searched before the context
    (``StreamConfig.prediction``'s), a draft from them never running past their end."""

    __slots__ = ("_ends", "_history", "_indexed", "_reference", "_text", "length", "size_m", "size_n")

    def __init__(self, size_n: int, size_m: int, *, sized: bool = True,
                 token_cost: float = FLASH_DRAFT_TOKEN_COST, reference: list[int] | None = None) -> None:
        self.size_n = size_n  # the n-gram looked up, and the shortest draft upstream proposes
        self.size_m = size_m  # the longest draft
        self.length = DraftLength(token_cost) if sized else None
        self._reference = list(reference or ())
        self._history: list[int] | None = None
        self._indexed = 0  # how much of the history _text holds
        self._text: list[int] = []  # the reference, then the history's tokens (media placeholders left out)
        self._ends: dict[int, list[int]] = {}  # token -> positions in _text where it stands, ascending

    def draft(self, history: list[int], sampled: int, room: int) -> list[int]:
        """The draft to verify after ``history`` (the tokens in the cache) and ``sampled`` (the token
        to decode next): at most ``room`` tokens; empty when there is no match, no room, or while
        pausing."""
        if room <= 0:
            return []
        length = self.length
        if length is not None and length.pausing():
            return []
        n, m = self.size_n, self.size_m
        base = len(self._reference)
        if not base and len(history) <= n + m + 1:
            return []
        self._index(history)
        history = self._text
        cur_len = len(history)
        if cur_len <= n + m + 1:
            return []
        positions = self._ends.get(sampled)
        if not positions:
            return []
        prefix = history[cur_len - n + 1:]  # the pattern is these n - 1 tokens and then ``sampled``
        last_start = cur_len - n - 1  # upstream's backward search starts here and never reaches 0
        for end in reversed(positions):
            start = end - n + 1
            if start > last_start:
                continue
            if start < 1:
                break
            if history[start:end] == prefix:
                copy = min(m, (base if start + n <= base else cur_len) - (start + n))
                if copy < n:
                    return []
                if length is not None and not _copying(history, start, cur_len - n + 1):
                    copy = length.best(min(copy, room))
                return history[start + n:start + n + min(copy, room)]
        return []

    def _index(self, history: list[int]) -> None:
        """The text of ``history`` and where each of its tokens stands (built once, extended as the
        cache grows)."""
        if history is not self._history or len(history) < self._indexed:
            self._history, self._indexed, self._text, self._ends = history, 0, [], {}
            self._append(self._reference)
        self._append(history[self._indexed:])
        self._indexed = len(history)

    def _append(self, tokens: list[int]) -> None:
        text, ends = self._text, self._ends
        for token in tokens:
            if token < 0:  # an image's or a clip's position
                continue
            found = ends.get(token)
            if found is None:
                ends[token] = [len(text)]
            else:
                found.append(len(text))
            text.append(token)

    def verified(self, proposed: int, accepted: int) -> None:
        """How the last draft fared: what sizes the next ones."""
        if self.length is not None:
            self.length.verified(proposed, accepted)

    def close(self) -> None:
        """Nothing to free."""
