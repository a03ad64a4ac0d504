"""ollama's ``truncate`` (its default since 0.12.6): a chat whose prompt does not fit the context is not
refused; its oldest messages are dropped until it fits, keeping the system messages and the last
message, as ollama's own chat prompt does. Unlike ollama, mullama does not shift the context while it
answers, so a prompt it shortens also leaves room for the answer (``answer_room``); a prompt that fits
is left whole, however little room it leaves."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ..generate._config import StreamConfig

__all__ = ["answer_room", "truncated"]

R = TypeVar("R")


def answer_room(config: StreamConfig, n_ctx: int) -> int:
    """The context a shortened prompt leaves for the answer: the tokens the request may generate, at most
    a quarter of the context (as ``mullama chat`` leaves when it drops old turns)."""
    return min(config.max_tokens, n_ctx // 4)


def truncated(messages: list[dict], measure: Callable[[list[dict]], R], fits: Callable[[R], bool]) -> R:
    """What ``measure`` makes (the prompt) of ``messages`` with the fewest of its oldest dropped for it to
    ``fits``; when even the last message alone (with the system messages) does not fit, of that shortest
    history, which the engine then refuses or takes as it is.

    A shortened history starts at a user message: the system messages before it are kept, and a tool's
    result never loses the call it answers, nor an answer its question (templates that want turns to
    alternate get them). Dropping more never lengthens a prompt, so the start is found by bisection:
    a long history is rendered a few times, not once per message."""
    starts = [index for index, message in enumerate(messages) if index > 0 and message.get("role") == "user"]
    if not starts:  # one turn: nothing to drop
        return measure(messages)
    made: dict[int, R] = {}
    low, high, best = 0, len(starts) - 1, len(starts) - 1
    while low <= high:
        middle = (low + high) // 2
        start = starts[middle]
        made[middle] = measure([message for message in messages[:start] if message.get("role") == "system"]
                               + messages[start:])
        if fits(made[middle]):
            best, high = middle, middle - 1
        else:
            low = middle + 1
    return made[best]  # measured: the last start is always tried when no earlier one fits
