"""The Responses API's conversation state: stored responses, which ``previous_response_id``
continues and ``GET`` / ``DELETE /v1/responses/{id}`` read and remove.

A response is stored unless its request says ``store: false`` (OpenAI's default is to store). They
live in this server process's memory, the newest ``capacity`` of them (OpenAI keeps them 30 days; a
local server keeps them until it restarts or newer ones push them out). Each keeps the conversation
its model saw, the input items (its own and those of the responses before it) then its output
items, so continuing one is that conversation, then the new input; as OpenAI's, the instructions of
an earlier response are not carried over.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ._request import APIError, bad

__all__ = ["CAPACITY", "ResponseStore", "StoredResponse", "input_items", "not_found"]

CAPACITY = 1000  # responses kept; the oldest go first


@dataclass(frozen=True)
class StoredResponse:
    body: dict  # the response object as it was answered
    conversation: list[dict]  # the input items its model saw (no instructions), then its output items


class ResponseStore:
    """Stored responses by id, the newest ``capacity`` (thread-safe: routes and workers share it)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def continued(self, body: Any) -> tuple[Any, list[dict]]:
        """``body`` with its ``previous_response_id`` resolved: the input is the stored conversation, then
        its own items; also that whole input, as items, to store with the answer. An id not stored is
        OpenAI's 404 ``previous_response_not_found``."""
        if not isinstance(body, dict):
            return body, []  # the route's parser says what is wrong with it
        previous, items = body.get("previous_response_id"), input_items(body.get("input"))
        if previous is None:
            return body, items
        if not isinstance(previous, str):
            raise bad("'previous_response_id' must be the id of an earlier response.", "previous_response_id")
        stored = self.get(previous)
        if stored is None:
            raise APIError(404, f"Previous response with id '{previous}' not found.", param="previous_response_id",
                           code="previous_response_not_found")
        items = [*stored.conversation, *items]
        return {**{key: value for key, value in body.items() if key != "previous_response_id"}, "input": items}, items

    def keep(self, body: dict, conversation: list[dict]) -> None:
        """Store a finished response (``body``, the object answered) and the conversation its model saw
        followed by its output."""
        with self._lock:
            self._kept[body["id"]] = StoredResponse(body, conversation)
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._kept.get(response_id)

    def delete(self, response_id: str) -> bool:
        """Remove a stored response; whether there was one."""
        with self._lock:
            return self._kept.pop(response_id, None) is not None


def input_items(value: Any) -> list[dict]:
    """A request's ``input`` as a list of input items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("'input' must be a string or a non-empty list of input items.", "input")
    return value


def not_found(response_id: str) -> APIError:
    """The 404 for an id no response here has (never stored, deleted, or pushed out)."""
    return APIError(404, f"No response found with id '{response_id}'.", param="response_id")
