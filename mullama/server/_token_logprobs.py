"""What every wire format says about a stream's tokens: which tokens an answer's logprobs describe, and
their entries (text, logprob, bytes, alternatives), which OpenAI's chat ``logprobs.content`` and ollama's
``logprobs`` both list. Shared, so that no format reads another's shapes."""

from __future__ import annotations

from collections.abc import Callable

from ..generate._sequence import Token

__all__ = ["Piece", "carrying", "described_tokens", "logprob_entries"]


Piece = Callable[[int], bytes]  # a token id's bytes (Model._cached_piece)


def described_tokens(tokens: list[Token]) -> list[Token]:
    """The tokens whose logprobs a whole choice carries: those of its content (not its thought), up to
    the last one that released text. The tokens of a matched stop sequence, held back and then dropped
    with it, are left out (as llama-server trims them), so the logprobs describe exactly the text
    returned. A stream sends the same tokens, each with the piece of text that releases it."""
    content = [token for token in tokens if token.kind != "reasoning"]
    end = next((i + 1 for i in range(len(content) - 1, -1, -1) if content[i].text), 0)
    return content[:end]


def carrying(tokens: list[Token] | None, piece: Piece) -> list[Token]:
    """The tokens that carry logprobs and have text (end-of-generation tokens, which have none, are left
    out as OpenAI does)."""
    return [t for t in tokens or () if t.logprob is not None and (t.text or piece(t.id))]


def logprob_entries(tokens: list[Token] | None, piece: Piece) -> list[dict]:
    """A chat's logprobs of ``tokens``, one entry per token that carries them: its text, logprob, bytes
    and ``top_logprobs`` (each with its text, logprob and bytes). OpenAI's ``logprobs.content`` and
    ollama's ``logprobs`` are both lists of these."""
    return [{"token": piece(t.id).decode("utf-8", "replace"), "logprob": t.logprob, "bytes": list(piece(t.id)),
             "top_logprobs": [{"token": top.text, "logprob": top.logprob, "bytes": list(top.bytes)}
                              for top in t.top_logprobs]} for t in carrying(tokens, piece)]
