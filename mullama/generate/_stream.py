"""TokenStream: a plain iterator of tokens, with statistics, that stops when you stop."""

from __future__ import annotations

from collections.abc import Generator, Iterator

from ._sequence import Sequence, SequenceView, Token

__all__ = ["Token", "TokenStream"]


class TokenStream(SequenceView):
    """Tokens of one generation, as they are produced.

    Iterate it (``for token in stream``), use it as a context manager, or ``close()``
    it: generation only advances when you ask for the next token, so breaking out of a
    loop, closing, or dropping the stream stops decoding at once and leaves the Context
    ready for the next call. Statistics are available during and after the stream.
    """

    _sequence: Sequence

    def __init__(self, steps: Generator[Token, None, None], sequence: Sequence) -> None:
        self._steps = steps  # the Context's generator: it holds the Context, never this stream
        self._sequence = sequence
        self.config = sequence.config
        self._closed = False

    def __iter__(self) -> Iterator[Token]:
        # The generator itself: a ``for`` loop then resumes it directly, with no method of ours
        # between tokens. It and ``next(stream)`` advance the same steps.
        return self._steps

    def __next__(self) -> Token:
        return next(self._steps)

    def close(self) -> None:
        """Stop generating now. Idempotent. From another thread while the stream's own thread is
        waiting for a token, the stream ends after that token (its thread frees what it uses)."""
        if self._closed:
            return
        try:
            self._steps.close()
        except ValueError:  # "generator already executing": another thread is stepping it right now
            self._sequence.cancel()
            return
        self._closed = True
        self._sequence.cancel()  # in case the generator never started
        self._sequence.close()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<mullama.TokenStream tokens={self.tokens_generated()} "
                f"finish_reason={self.finish_reason!r}>")
