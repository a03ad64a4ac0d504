"""Where a sequence's cached tokens sit: llama.cpp positions against indexes in the list of cached tokens.

For most prompts the token at index i of a sequence's cache sits at position i. A media chunk decoded
with M-RoPE positions (Qwen2-VL and kin, ``mtmd_decode_use_mrope``) takes fewer positions than it has
embeddings: an image of nx x ny embeddings is decoded at 2-D positions from its first one and advances
the next position by max(nx, ny) (``mtmd_input_chunk_get_n_pos``, what llama-server's
``server_tokens::pos_next`` counts), so every token after it sits at its index plus a (negative) shift.
A :class:`CachePositions` beside each list of cached tokens (a Context's, each engine slot's) records
those chunks; it stays empty, and costs nothing, for every other prompt.

Cutting a cache back (a new prompt that shares a prefix, a failed decode, rejected draft tokens) goes
through :meth:`CachePositions.cut`: it names the position to drop cells from, and never cuts inside such
a chunk (its cells all sit at its first position, so a cut inside it would keep them all).
"""

from __future__ import annotations

__all__ = ["CachePositions"]


class CachePositions:
    """The M-RoPE media chunks of one sequence's cache: ``shift`` (position minus index) after the last
    cached token, and each chunk's span."""

    __slots__ = ("_spans", "shift")

    def __init__(self) -> None:
        self._spans: list[tuple[int, int, int]] = []  # (start index, end index, shift after it), in order
        self.shift = 0

    def __bool__(self) -> bool:
        """Whether the cache holds a chunk whose positions are not its indexes."""
        return bool(self._spans)

    def add(self, start: int, end: int, n_pos: int) -> None:
        """The cache's tokens ``start`` to ``end`` are a media chunk that took ``n_pos`` positions."""
        if n_pos != end - start:
            self.shift += n_pos - (end - start)
            self._spans.append((start, end, self.shift))

    def cut(self, keep: int) -> tuple[int, int]:
        """Forget what follows the first ``keep`` tokens, cut back to the start of a chunk ``keep``
        falls inside: ``(tokens kept, the position to drop the sequence's cells from)``."""
        spans = self._spans
        while spans and spans[-1][1] > keep:
            start, _end, _after = spans.pop()
            keep = min(keep, start)
        self.shift = spans[-1][2] if spans else 0
        return keep, keep + self.shift

    def clear(self) -> None:
        self._spans = []
        self.shift = 0
