"""The Responses API's conversation state: stored responses, which ``previous_response_id``
continues, ``GET`` / ``DELETE /v1/responses/{id}`` read and remove, ``GET
/v1/responses/{id}/input_items`` lists the input of, and whose items an ``item_reference`` names.

A response is stored unless its request says ``store: false`` (OpenAI's default is to store). They
live in this server process's memory, the newest ``capacity`` of them (OpenAI keeps them 30 days; a
local server keeps them until it restarts or newer ones push them out). Each keeps the conversation
its model saw, the input items (its own and those of the responses before it) then its output
items, so continuing one is that conversation, then the new input; as OpenAI's, the instructions of
an earlier response are not carried over. Input items are kept as OpenAI lists them: each with an
id (``msg_``, ``fc_``, ...) given when it is stored, a message's text as content parts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ._request import APIError, bad
from ._response_output import new_id

__all__ = ["CAPACITY", "ResponseStore", "StoredResponse", "input_items", "not_found"]

CAPACITY = 1000  # responses kept; the oldest go first
PAGE_LIMIT = (20, 100)  # input items listed at once: OpenAI's default and largest
ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


@dataclass(frozen=True)
class StoredResponse:
    body: dict  # the response object as it was answered
    conversation: list[dict]  # the input items its model saw (no instructions), then its output items
    inputs: int  # how many of those are input items

    def input_page(self, after: str | None, limit: int, order: str) -> dict:
        """A page of the input items, OpenAI's list object: ``order`` "desc" lists the newest first,
        ``after`` names the item the page follows."""
        items = self.conversation[:self.inputs]
        if order == "desc":
            items = items[::-1]
        if after is not None:
            ids = [item["id"] for item in items]
            if after not in ids:
                raise bad(f"'after' must be the id of an input item of response '{self.body['id']}': "
                          f"it has no item '{after}'.", "after")
            items = items[ids.index(after) + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}


class ResponseStore:
    """Stored responses by id, the newest ``capacity`` (thread-safe: routes and workers share it)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()
        self._lock = threading.Lock()

    def continued(self, body: Any) -> tuple[Any, list[dict]]:
        """``body`` with its stored state resolved: after ``previous_response_id`` the input is the stored
        conversation, then its own items, each ``item_reference`` the item it names; also that whole
        input, as items, to store with the answer. An id not stored is OpenAI's 404
        (``previous_response_not_found`` for a response)."""
        if not isinstance(body, dict):
            return body, []  # the route's parser says what is wrong with it
        previous, sent = body.get("previous_response_id"), input_items(body.get("input"))
        items = self._referenced(sent)
        if previous is None:
            return (body if items is sent else {**body, "input": items}), items
        if not isinstance(previous, str):
            raise bad("'previous_response_id' must be the id of an earlier response.", "previous_response_id")
        stored = self.get(previous)
        if stored is None:
            raise APIError(404, f"Previous response with id '{previous}' not found.", param="previous_response_id",
                           code="previous_response_not_found")
        items = [*stored.conversation, *items]
        return {**{key: value for key, value in body.items() if key != "previous_response_id"}, "input": items}, items

    def keep(self, body: dict, inputs: list[dict], outputs: list[dict]) -> None:
        """Store a finished response (``body``, the object answered): the input its model saw (as
        ``continued`` gave it), then its output items."""
        stored = StoredResponse(body, [*map(_listed, inputs), *outputs], len(inputs))
        with self._lock:
            self._kept[body["id"]] = stored
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            return self._kept.get(response_id)

    def delete(self, response_id: str) -> bool:
        """Remove a stored response; whether there was one."""
        with self._lock:
            return self._kept.pop(response_id, None) is not None

    def _referenced(self, items: list[dict]) -> list[dict]:
        """``items`` with each ``item_reference`` replaced by the stored item of that id (an input or
        output item of a stored response); an id none has is OpenAI's 404."""
        if not any(isinstance(item, dict) and item.get("type") == "item_reference" for item in items):
            return items
        with self._lock:
            stored = {item["id"]: item for response in self._kept.values() for item in response.conversation}
        resolved = []
        for item in items:
            if isinstance(item, dict) and item.get("type") == "item_reference":
                reference = item.get("id")
                if reference not in stored:
                    raise APIError(404, f"Item with id '{reference}' not found: an item_reference names an item "
                                   "of a response stored on this server (not one sent with store: false, "
                                   "deleted, or from before it restarted).", param="input")
                item = stored[reference]
            resolved.append(item)
        return resolved


def input_items(value: Any) -> list[dict]:
    """A request's ``input`` as a list of input items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad("'input' must be a string or a non-empty list of input items.", "input")
    return value


def _listed(item: Any) -> Any:
    """An input item as OpenAI lists it: with an id and a status, a message's text as a content part
    (``input_text``, or ``output_text`` for the assistant's)."""
    if not isinstance(item, dict):
        return item  # the parser refused it before a response was made
    kind = item.get("type", "message")
    listed = {"type": kind, **item, "id": item.get("id") or new_id(ID_PREFIXES.get(kind, "item")),
              "status": item.get("status") or "completed"}
    if kind == "message" and isinstance(item.get("content"), str):
        assistant = item.get("role") == "assistant"
        listed["content"] = [{"type": "output_text", "text": item["content"], "annotations": []} if assistant
                             else {"type": "input_text", "text": item["content"]}]
    return listed


def not_found(response_id: str) -> APIError:
    """The 404 for an id no response here has (never stored, deleted, or pushed out)."""
    return APIError(404, f"No response found with id '{response_id}'.", param="response_id")
