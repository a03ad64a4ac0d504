"""TokenBatch: an owned ``llama_batch`` filled row by row, for the engine's steps, speculative
verification and embeddings (``llama_batch_get_one`` serves the single-sequence prompt decodes)."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

__all__ = ["TokenBatch"]


class TokenBatch:
    """A ``llama_batch`` of up to ``capacity`` rows with one sequence id each, freed exactly once
    (``close()``, or when the object is dropped). Callers count the rows they put (``put`` returns
    the next free row) and decode that many."""

    __slots__ = ("__weakref__", "_batch", "_free", "_lib", "capacity")

    def __init__(self, lib: Any, capacity: int) -> None:
        self._lib = lib
        self.capacity = capacity
        self._batch = lib.llama_batch_init(capacity, 0, 1)
        self._free = weakref.finalize(self, lib.llama_batch_free, self._batch)
        # Not at interpreter exit: a thread still streaming may be filling it then (the process's end frees it).
        self._free.atexit = False

    def put(self, row: int, token: int, pos: int, seq_id: int, logits: bool) -> int:
        """Set row ``row``: ``token`` at position ``pos`` of sequence ``seq_id``, its logits kept or not."""
        batch = self._batch
        batch.token[row] = token
        batch.pos[row] = pos
        batch.n_seq_id[row] = 1
        batch.seq_id[row][0] = seq_id
        batch.logits[row] = logits
        return row + 1

    def put_run(self, row: int, tokens: Iterable[int], position: int, seq_id: int) -> int:
        """Put ``tokens`` at positions ``position``, ``position + 1``, … of ``seq_id``, each row's output kept."""
        batch = self._batch
        token, pos, n_seq_id, seq, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        for value in tokens:
            token[row] = value
            pos[row] = position
            n_seq_id[row] = 1
            seq[row][0] = seq_id
            logits[row] = 1
            row += 1
            position += 1
        return row

    def decode(self, ctx: Any, n_tokens: int, *, encode: bool = False) -> int:
        """``llama_decode`` (or ``llama_encode``) of the first ``n_tokens`` rows on ``ctx``; its result code."""
        self._batch.n_tokens = n_tokens
        return int((self._lib.llama_encode if encode else self._lib.llama_decode)(ctx, self._batch))

    def close(self) -> None:
        """Free the batch now (idempotent)."""
        self._free()
