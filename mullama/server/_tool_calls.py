"""Tool calls as a sequence writes them, in no wire format's shape: for each token, the calls it began
(``CallStart``: the call's index, id and name) and the text it added to a call's arguments
(``CallArguments``). Each wire format streams these events in its own shape (OpenAI's
``delta.tool_calls``, Anthropic's ``tool_use`` blocks, the Responses API's ``function_call`` items)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

__all__ = ["CallArguments", "CallStart", "ToolCallProgress"]


@dataclass(frozen=True)
class CallStart:
    """A call begins: its index among the sequence's calls, its id (the parser's, else a new one) and name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """More text of the arguments of call ``index``."""

    index: int
    text: str


class ToolCallProgress:
    """The tool-call events of one sequence, from its tool-call parser as tokens come: each call's start
    first, then its arguments in pieces."""

    def __init__(self) -> None:
        self.index = 0  # the call being streamed
        self.sent = 0  # characters of its arguments sent
        self.started = False

    def after(self, parser: Any) -> list[CallStart | CallArguments]:
        """The events a token added (``parser`` is the sequence's ToolCallParser)."""
        events: list[CallStart | CallArguments] = []
        while self.index < len(parser.calls):  # calls completed: send what is left of them
            call = parser.calls[self.index]
            events += self._progress(call.name, call.arguments, call.id)
            self.index, self.sent, self.started = self.index + 1, 0, False
        if parser.in_call and parser.name is not None:
            events += self._progress(parser.name, parser.arguments, None)
        return events

    def _progress(self, name: str, arguments: str, call_id: str | None) -> list[CallStart | CallArguments]:
        events: list[CallStart | CallArguments] = []
        if not self.started:
            self.started = True
            events.append(CallStart(self.index, call_id or f"call_{secrets.token_hex(12)}", name))
        if len(arguments) > self.sent:
            events.append(CallArguments(self.index, arguments[self.sent:]))
            self.sent = len(arguments)
        return events
