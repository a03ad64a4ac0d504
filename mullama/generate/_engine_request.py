"""A request in the batching engine, and the slot (a sequence of the shared context) serving it."""

from __future__ import annotations

import threading

from ._channel import Channel
from ._lora import LoraSet
from ._positions import CachePositions
from ._sequence import Sequence, SequenceView, Token

__all__ = ["EngineRequest"]


class EngineRequest(SequenceView):
    """One sequence in the engine: read its tokens with ``next_token()``; ``cancel()`` ends it.

    Statistics are those of every stream (``text``, ``finish_reason``, ``tokens_generated()``, ...).
    """

    _sequence: Sequence
    lora: LoraSet = ()  # the LoRA adapters it decodes with (its config's lora, else the model's)
    pinned_slot: int | None = None  # the slot it must run in (llama-server's id_slot), else any
    slot_id = -1  # the slot serving it, once one does

    def __init__(self, sequence: Sequence, request_id: int, wake: threading.Event) -> None:
        self._sequence = sequence
        self.id = request_id
        self.config = sequence.config
        self.channel = Channel(sequence.config.buffer_size)
        # A reader taking a token may un-pause its sequence: let the engine look again.
        self.channel.on_take = wake.set
        self._wake = wake
        self._cancelled = False

    def cancel(self) -> None:
        """Stop this sequence; its slot and KV cells are released by the next step. A reader still
        waiting for its next token (a route whose client went away) gets the end at once."""
        if not self._cancelled:
            self._cancelled = True
            self.channel.close()
            self.channel.finish()
            self._wake.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    async def next_token(self) -> Token | None:
        """The next token, awaited without blocking the event loop; None at the end."""
        result: Token | None = await self.channel.get_async()
        return result


class _Slot:
    """A sequence of the shared context, and the request it is serving."""

    __slots__ = ("batch_row", "breaks", "cached", "draft", "lora", "next_token", "pending_prompt", "positions",
                 "request", "seq_id")

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.cached: list[int] = []  # tokens whose KV cells this sequence holds
        self.positions = CachePositions()  # where they sit, when an M-RoPE image moved them (see _positions)
        self.request: EngineRequest | None = None
        self.pending_prompt: list[int] = []
        self.breaks: tuple[int, ...] = ()  # positions where a prompt batch must end (prompt_breaks)
        self.next_token: int | None = None  # sampled, delivered, not yet decoded
        self.batch_row = -1
        self.draft: list[int] = []  # tokens drafted after next_token, decoded with it (speculative decoding)
        self.lora: LoraSet = ()  # the LoRA adapters its cached cells were computed with

    def forget_cache(self) -> None:
        """The sequence's cells are gone (the caller removed them): nothing cached, no positions."""
        self.cached = []
        self.positions.clear()
