"""The whole result of a generation (``generate()``), made from a finished stream: one place for
Context and AsyncModel, so both report the same fields."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._sequence import SequenceView, Token

__all__ = ["Completion", "greedy_unless_told"]


@dataclass
class Completion:
    """The result of :meth:`Context.generate` and :meth:`AsyncModel.generate`."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of generation or a stop sequence), "length" (max_tokens or context full)
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    timings: dict[str, Any] = field(default_factory=dict)
    prompt_logprobs: list[Token] = field(default_factory=list)  # with StreamConfig(prompt_logprobs=K)

    def __str__(self) -> str:
        return self.text

    @classmethod
    def from_stream(cls, stream: SequenceView, total_seconds: float) -> Completion:
        """The completion a finished ``stream`` made, ``total_seconds`` after it was asked for."""
        return cls(
            text=stream.text,
            token_ids=stream.token_ids,
            finish_reason=stream.finish_reason or "stop",
            prompt_tokens=stream.prompt_tokens,
            cached_tokens=stream.cached_tokens,
            timings={"prompt_seconds": stream.prompt_seconds(), "total_seconds": total_seconds,
                     "time_to_first_token": stream.time_to_first_token(),
                     "tokens_per_second": stream.tokens_per_second(),
                     "draft_proposed": stream.draft_proposed, "draft_accepted": stream.draft_accepted},
            prompt_logprobs=stream.prompt_logprobs,
        )


def greedy_unless_told(config: Any, options: dict[str, Any]) -> None:
    """``generate()`` is greedy unless a config or a temperature says otherwise."""
    if config is None and "temperature" not in options:
        options["temperature"] = 0.0
