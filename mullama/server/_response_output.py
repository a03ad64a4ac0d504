"""The output items of a Responses API answer, built from its sequence's tokens as they come, and the
stream events that describe each change (``response.output_item.added``, ``...output_text.delta``,
``...function_call_arguments.delta``, ...)."""

from __future__ import annotations

import copy
import secrets
from typing import Any

from ..generate._sequence import Token
from ._tool_calls import CallStart, ToolCallProgress

__all__ = ["ResponseOutput", "new_id"]

def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class ResponseOutput:
    """The ``output`` items of one response, built from its sequence's tokens as they come: reasoning,
    a message (``output_text``) and ``function_call`` items, each opened and closed in turn. ``feed``
    and ``finish`` return the stream events (type, payload) that describe each change; a non-streamed
    answer builds its items the same way and ignores them."""

    def __init__(self) -> None:
        self.items: list[dict] = []
        self.open: dict | None = None  # the item being written
        self.calls = ToolCallProgress()
        self.reasoning_tokens = 0

    def feed(self, token: Token, parser: Any) -> list[tuple[str, dict]]:
        """The events for one token (``parser``: the sequence's ToolCallParser, or None). Call items
        advance on tokens written inside a call, so text read before them comes first."""
        events: list[tuple[str, dict]] = []
        if token.kind == "reasoning":
            self.reasoning_tokens += 1
        if token.text:
            kind = "reasoning" if token.kind == "reasoning" else "message"
            events += self._text(kind, token.text)
        if parser is not None and token.kind == "tool_call":
            events += self._calls(parser)
        return events

    def finish(self, parser: Any, status: str) -> list[tuple[str, dict]]:
        """The events that close the answer: the rest of its calls, and its open item."""
        events = self._calls(parser) if parser is not None else []
        return events + self._close(status)

    def _text(self, kind: str, text: str) -> list[tuple[str, dict]]:
        events = []
        if self.open is None or self.open["type"] != kind:
            events += self._close("completed")
            item: dict[str, Any]
            if kind == "message":
                item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                        "content": []}
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            else:
                item = {"id": new_id("rs"), "type": "reasoning", "status": "in_progress", "summary": [],
                        "content": []}
                part = {"type": "reasoning_text", "text": ""}
            events += self._add(item)
            item["content"].append(part)
            events.append(("response.content_part.added", {**self._where(item), "content_index": 0,
                                                            "part": dict(part)}))
        assert self.open is not None
        self.open["content"][0]["text"] += text
        delta = {**self._where(self.open), "content_index": 0, "delta": text}
        if kind == "message":
            events.append(("response.output_text.delta", {**delta, "logprobs": []}))
        else:
            events.append(("response.reasoning_text.delta", delta))
        return events

    def _calls(self, parser: Any) -> list[tuple[str, dict]]:
        events = []
        for call in self.calls.after(parser):
            if isinstance(call, CallStart):
                events += self._close("completed")
                events += self._add({"id": new_id("fc"), "type": "function_call", "status": "in_progress",
                                     "call_id": call.id, "name": call.name, "arguments": ""})
            else:
                assert self.open is not None
                self.open["arguments"] += call.text
                events.append(("response.function_call_arguments.delta", {**self._where(self.open),
                                                                           "delta": call.text}))
        return events

    def _where(self, item: dict) -> dict:
        assert item is self.items[-1]  # only the last item is ever open
        return {"item_id": item["id"], "output_index": len(self.items) - 1}

    def _add(self, item: dict) -> list[tuple[str, dict]]:
        self.items.append(item)
        self.open = item
        return [("response.output_item.added", {"output_index": len(self.items) - 1, "item": _copy(item)})]

    def _close(self, status: str) -> list[tuple[str, dict]]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        where = self._where(item)
        if item["type"] == "function_call":
            events = [("response.function_call_arguments.done", {**where, "name": item["name"],
                                                                 "arguments": item["arguments"]})]
        else:
            part = item["content"][0]
            done = "response.output_text.done" if item["type"] == "message" else "response.reasoning_text.done"
            events = [(done, {**where, "content_index": 0, "text": part["text"],
                              **({"logprobs": []} if item["type"] == "message" else {})}),
                      ("response.content_part.done", {**where, "content_index": 0, "part": dict(part)})]
        return [*events, ("response.output_item.done", {"output_index": where["output_index"], "item": _copy(item)})]


def _copy(item: dict) -> dict:
    """A snapshot of an item as it is now (the item itself goes on growing)."""
    return copy.deepcopy(item)
