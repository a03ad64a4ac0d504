"""Exact streaming text: bytes of tokens in, whole characters out, stop sequences held back.

A token's bytes may end inside a multi-byte UTF-8 character; the incremental decoder
keeps those bytes until the character is complete, so nothing comes out broken or
twice. A stop sequence may be split over several tokens; the text that could still
become a stop sequence is held back until it either completes (and is dropped, with
everything after it) or cannot anymore (and is released). Each token's text is looked
at once: the work per token does not grow with the length of the output.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["TextAssembler", "held_suffix"]


def held_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of one of ``markers`` (text to hold
    back until it is known whether the marker follows)."""
    longest = max((len(marker) for marker in markers), default=0)
    for length in range(min(len(text), longest - 1), 0, -1):
        tail = text[-length:]
        if any(marker.startswith(tail) for marker in markers):
            return length
    return 0


class TextAssembler:
    """Turn token bytes into text that is safe to show."""

    __slots__ = ("_decoder", "_held", "_pending", "_stops", "stop_sequence", "stopped")

    def __init__(self, stop_sequences: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = False
        self._stops = tuple(stop_sequences)
        self._pending = ""  # decoded text held back because it may begin a stop sequence
        self.stopped = False
        self.stop_sequence: str | None = None

    def feed(self, piece: bytes, text: str | None = None) -> str:
        """Add one token's bytes (and their text, when the caller knows they are whole UTF-8
        characters); return the text that can be shown now (maybe "")."""
        if text is None or self._held:
            text = self._decoder.decode(piece)
            self._held = bool(self._decoder.getstate()[0])  # a character's first bytes, waiting for the rest
        if not self._stops:
            return text
        if self.stopped:
            return ""
        # Only the held text and the new text can contain a match that was not checked before.
        window = self._pending + text
        first = -1
        for stop in self._stops:
            at = window.find(stop)
            if at != -1 and (first == -1 or at < first):
                first, self.stop_sequence = at, stop
        if first != -1:
            self.stopped = True
            self._pending = ""
            return window[:first]
        hold = held_suffix(window, self._stops)
        self._pending = window[len(window) - hold:] if hold else ""
        return window[:len(window) - hold]

    def add(self, piece: bytes, finish: str | None, text: str | None = None) -> tuple[str, str | None]:
        """One generated token: its bytes, and why generation ends after it, if it does
        ("stop" for an end-of-generation token, whose bytes are not text; "length" for the last
        token allowed); ``text`` as :meth:`feed` takes it. Returns the text to show now and the
        finish reason, which becomes "stop" when a stop sequence completes (``stop_sequence`` says
        which)."""
        if text is not None and finish is None and not self._held and not self._stops:
            return text, None  # the common case: whole characters, nothing to watch for
        if finish == "stop":
            return self.flush(), "stop"
        text = self.feed(piece, text)
        if self.stopped:
            return text, "stop"
        if finish is not None:
            text += self.flush()
        return text, finish

    def flush(self) -> str:
        """The end of generation (not by a stop sequence): release everything held."""
        text = self._decoder.decode(b"", final=True)
        self._held = False
        if self.stopped:
            return ""
        text, self._pending = self._pending + text, ""
        return text
