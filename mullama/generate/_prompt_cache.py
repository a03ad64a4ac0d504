"""Earlier prompts' KV states in host memory: llama-server's ``--cache-ram``.

When the engine gives a slot to a request whose prompt keeps less than half of the slot's
cache, the slot's state (its tokens and their KV cells, through
``llama_state_seq_get_data_ext``) is copied here before it is trimmed; then the entry that
shares the most with the new prompt, if it beats what the slot already has, is restored into
the slot. So a system prompt, an agent's instructions or a RAG context that other requests
pushed out of every slot is decoded once, not once per return.

The rules are upstream's (``server_prompt_cache`` of the pinned tree): an entry fully contained
in another is never kept twice; entries contained in a new one are dropped; the oldest entries
go first when the byte budget is reached; an entry is restored only when it keeps at least a
quarter of itself and beats the slot both in the share of itself kept and in the share of the
new prompt covered (by a tenth of the prompt at least: a copy is not free); a restored entry
leaves the cache (the slot holds it now, and is saved again when it is given away).

Beyond upstream, the engine's other sequences are candidates too: a prompt that another sequence
holds (or is answering right now) is copied from it instead of being decoded again. Models whose
cache cannot be cut back (sliding-window attention, recurrent state) are not cached here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._context_params import common_prefix

__all__ = ["DEFAULT_CACHE_RAM_MIB", "MIB", "SAVE_BELOW_KEEP", "PromptCache"]

MIB = 1024 * 1024
DEFAULT_CACHE_RAM_MIB = 8192  # llama-server's default at the pinned commit
# A state is taken only when it covers at least this share of the new prompt more than the slot
# does (llama-server's slot-similarity threshold): copying a state costs about as much as decoding
# a few dozen tokens, so a few more shared tokens are not worth it.
MIN_GAIN = 0.1
# A slot's state is saved only when the new prompt keeps less than this share of it: otherwise most
# of it stays in the slot anyway (a new question after the same system prompt saves nothing).
SAVE_BELOW_KEEP = 0.5


@dataclass
class _Entry:
    tokens: list[int]
    data: Any  # a cffi uint8_t[] holding llama_state_seq_get_data_ext's bytes
    size: int


class PromptCache:
    """KV states of earlier prompts, newest last, within ``limit_bytes`` (0 or less: no limit)."""

    def __init__(self, ffi: Any, lib: Any, limit_bytes: int) -> None:
        self._ffi, self._lib = ffi, lib
        self.limit_bytes = limit_bytes
        self._entries: list[_Entry] = []
        self.stats = {"saved": 0, "restored": 0, "copied": 0, "evicted": 0, "restored_tokens": 0}

    @property
    def size_bytes(self) -> int:
        return sum(entry.size for entry in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def save(self, ctx: Any, seq_id: int, tokens: list[int]) -> bool:
        """Copy sequence ``seq_id`` of ``ctx`` (holding ``tokens``) here. False when it is empty,
        already here, or alone larger than the budget."""
        if not tokens:
            return False
        if any(common_prefix(entry.tokens, tokens) == len(tokens) for entry in self._entries):
            return False
        lib = self._lib
        size = lib.llama_state_seq_get_size_ext(ctx, seq_id, 0)
        if self.limit_bytes > 0 and size > self.limit_bytes:
            return False
        kept = []
        for entry in self._entries:
            if common_prefix(entry.tokens, tokens) == len(entry.tokens):
                self.stats["evicted"] += 1  # contained in the new one: obsolete
            else:
                kept.append(entry)
        self._entries = kept
        self._shrink_to(self.limit_bytes - size)
        data = self._ffi.new("uint8_t[]", size)
        if lib.llama_state_seq_get_data_ext(ctx, data, size, seq_id, 0) != size:
            return False
        self._entries.append(_Entry(list(tokens), data, size))
        self.stats["saved"] += 1
        return True

    def restore(self, ctx: Any, seq_id: int, cached: list[int], prompt: list[int],
                live: Sequence[tuple[int, list[int]]] = ()) -> list[int] | None:
        """Put the state that serves ``prompt`` best into sequence ``seq_id`` (which holds
        ``cached``) when it beats what is there: an entry of this cache (which then leaves it), or
        one of the ``live`` sequences of the same context, ``(seq_id, tokens)``, copied (a prompt
        another sequence is answering right now is not decoded twice). Returns the tokens the
        sequence then holds, or None when nothing was restored (the sequence is untouched)."""
        best_common = common_prefix(cached, prompt)
        best_keep = best_common / len(cached) if cached else -1.0
        best_share = best_common / len(prompt)
        best: _Entry | tuple[int, list[int]] | None = None
        candidates: list[_Entry | tuple[int, list[int]]] = [*self._entries, *live]
        for candidate in candidates:
            tokens = candidate.tokens if isinstance(candidate, _Entry) else candidate[1]
            if not tokens:
                continue
            common = common_prefix(tokens, prompt)
            keep, share = common / len(tokens), common / len(prompt)
            if keep < 0.25:  # restoring it would throw most of it away
                continue
            if common - best_common < MIN_GAIN * len(prompt):  # not worth a copy of the whole state
                continue
            if keep > best_keep and share > best_share:
                best, best_keep, best_share = candidate, keep, share
        if best is None:
            return None
        if isinstance(best, _Entry):
            self._entries.remove(best)
            data, size, tokens = best.data, best.size, best.tokens
        else:
            source, tokens = best
            size = self._lib.llama_state_seq_get_size_ext(ctx, source, 0)
            data = self._ffi.new("uint8_t[]", size)
            if self._lib.llama_state_seq_get_data_ext(ctx, data, size, source, 0) != size:
                return None
            tokens = list(tokens)
        if self._lib.llama_state_seq_set_data_ext(ctx, data, size, seq_id, 0) != size:
            self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(ctx), seq_id, -1, -1)
            return []
        self.stats["restored" if isinstance(best, _Entry) else "copied"] += 1
        self.stats["restored_tokens"] += common_prefix(tokens, prompt)
        return tokens

    def swap(self, ctx: Any, slot: Any, slots: Sequence[Any], prompt: list[int]) -> None:
        """Before ``slot`` (an engine slot: ``seq_id``, ``cached``, ``positions``) loses most of its cells to
        ``prompt``, keep them here; then restore from here, or copy from another of ``slots``, whatever
        serves ``prompt`` better than the slot does. A sequence holding an image at M-RoPE positions is
        neither kept nor copied: its tokens alone do not say where its cells sit."""
        if not slot.positions and common_prefix(slot.cached, prompt) < SAVE_BELOW_KEEP * len(slot.cached):
            self.save(ctx, slot.seq_id, slot.cached)
        live = [(other.seq_id, other.cached) for other in slots
                if other is not slot and other.cached and not other.lora and not other.positions]
        restored = self.restore(ctx, slot.seq_id, slot.cached, prompt, live)
        if restored is not None:
            slot.cached = restored
            slot.positions.clear()

    def clear(self) -> None:
        self._entries = []

    def _shrink_to(self, room: int) -> None:
        """Drop the oldest entries until at most ``room`` bytes are held (no limit: nothing)."""
        if self.limit_bytes <= 0:
            return
        while self._entries and self.size_bytes > room:
            self._entries.pop(0)
            self.stats["evicted"] += 1
