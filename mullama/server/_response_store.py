"""The Responses API's conversation state: stored responses, which ``previous_response_id``
continues, ``GET`` / ``DELETE /v1/responses/{id}`` read and remove, ``GET
/v1/responses/{id}/input_items`` lists the input of, and whose items an ``item_reference`` names;
and conversations (the Conversations API, ``/v1/conversations``), which a response's ``conversation``
continues and then grows by its input and output.

A response is stored unless its request says ``store: false`` (OpenAI's default is to store). They
live in this server process's memory, the newest ``capacity`` of them (OpenAI keeps them 30 days; a
local server keeps them until it restarts or newer ones push them out); so do conversations, the
``capacity`` most recently used. A stored response keeps the conversation its model saw, the input
items (its own and those of the responses before it) then its output items, so continuing one is
that conversation, then the new input; as OpenAI's, the instructions of an earlier response are not
carried over. Items are kept as OpenAI lists them: each with an id (``msg_``, ``fc_``, ...) given
when the request came, a message's text as content parts.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ._request import APIError, bad
from ._response_output import new_id

__all__ = ["CAPACITY", "MAX_NEW_ITEMS", "Conversation", "ConversationStore", "Opened", "ResponseStore",
           "StoredResponse", "input_items", "item_page", "list_object", "listed", "not_found", "page_query",
           "unique"]

CAPACITY = 1000  # responses (and conversations) kept; the oldest go first
PAGE_LIMIT = (20, 100)  # items listed at once: OpenAI's default and largest
MAX_NEW_ITEMS = 20  # items a conversation is given at once, as OpenAI's
T = TypeVar("T")
ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


@dataclass(frozen=True)
class StoredResponse:
    body: dict  # the response object as it was answered
    conversation: list[dict]  # the input items its model saw (no instructions), then its output items
    inputs: int  # how many of those are input items


class _Kept(Generic[T]):
    """Values by id, at most ``capacity`` of them: the first in the order goes first (thread-safe:
    routes and workers share them)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._kept: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()

    def _put(self, key: str, value: T) -> None:
        with self._lock:
            self._kept[key] = value
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)


class ResponseStore(_Kept[StoredResponse]):
    """Stored responses by id, the newest ``capacity``."""

    def continued(self, body: Any) -> tuple[Any, list[dict]]:
        """``body`` with its stored state resolved: after ``previous_response_id`` the input is the stored
        conversation, then its own items, each ``item_reference`` the item it names; also that whole
        input, as listed items (``listed``), to store with the answer. An id not stored is OpenAI's 404
        (``previous_response_not_found`` for a response)."""
        if not isinstance(body, dict):
            return body, []  # the route's parser says what is wrong with it
        previous, sent = body.get("previous_response_id"), input_items(body.get("input"))
        items = self._referenced(sent)
        if previous is None:
            return (body if items is sent else {**body, "input": items}), unique(listed(items))
        if not isinstance(previous, str):
            raise bad("'previous_response_id' must be the id of an earlier response.", "previous_response_id")
        stored = self.get(previous)
        if stored is None:
            raise APIError(404, f"Previous response with id '{previous}' not found.", param="previous_response_id",
                           code="previous_response_not_found")
        items = unique([*stored.conversation, *listed(items)])
        return {**{key: value for key, value in body.items() if key != "previous_response_id"}, "input": items}, items

    def keep(self, body: dict, inputs: list[dict], outputs: list[dict]) -> None:
        """Store a finished response (``body``, the object answered): the input its model saw (as
        ``continued`` gave it), then its output items."""
        self._put(body["id"], StoredResponse(body, [*inputs, *outputs], len(inputs)))

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
                if not isinstance(reference, str):
                    raise bad("an item_reference needs the 'id' string of a stored item.", "input")
                if reference not in stored:
                    raise APIError(404, f"Item with id '{reference}' not found: an item_reference names an item "
                                   "of a response stored on this server (not one sent with store: false, "
                                   "deleted, or from before it restarted).", param="input")
                item = stored[reference]
            resolved.append(item)
        return resolved


@dataclass
class Conversation:
    """A conversation of the Conversations API: its items, oldest first, and its metadata."""

    id: str
    created_at: int
    metadata: dict
    items: list[dict] = field(default_factory=list)

    def body(self) -> dict:
        """OpenAI's conversation object."""
        return {"id": self.id, "object": "conversation", "created_at": self.created_at, "metadata": self.metadata}

    def item(self, item_id: str) -> dict:
        found = next((item for item in self.items if item["id"] == item_id), None)
        if found is None:
            raise APIError(404, f"Item with id '{item_id}' not found in conversation '{self.id}'.", param="item_id")
        return found


class ConversationStore(_Kept[Conversation]):
    """Conversations by id, the ``capacity`` most recently used."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        super().__init__(capacity)
        self._busy: dict[str, object] = {}  # conversation -> the claim of the response being made in it

    def create(self, items: list[dict], metadata: dict) -> Conversation:
        conversation = Conversation(new_id("conv"), int(time.time()), metadata,
                                    unique(listed(items, "items"), "items"))
        self._put(conversation.id, conversation)
        return conversation

    def get(self, conversation_id: str, param: str = "conversation_id") -> Conversation:
        """The conversation of that id (now the most recently used); OpenAI's 404 when none has it."""
        with self._lock:
            found = self._kept.get(conversation_id)
            if found is not None:
                self._kept.move_to_end(conversation_id)
        if found is None:
            raise APIError(404, f"Conversation with id '{conversation_id}' not found.", param=param)
        return found

    def delete(self, conversation_id: str) -> None:
        with self._lock:
            if self._kept.pop(conversation_id, None) is not None:
                return
        raise APIError(404, f"Conversation with id '{conversation_id}' not found.", param="conversation_id")

    def extend(self, conversation_id: str, items: list[dict]) -> list[dict]:
        """Add items (listed) to the end of a conversation; the items added. An id it has already is a
        400, as OpenAI's."""
        added = listed(items, "items")
        conversation = self.get(conversation_id)
        with self._lock:
            unique([*conversation.items, *added], "items")
            conversation.items.extend(added)
        return added

    def remove_item(self, conversation_id: str, item_id: str) -> Conversation:
        conversation = self.get(conversation_id)
        with self._lock:
            conversation.items.remove(conversation.item(item_id))
        return conversation

    def opened(self, body: Any, *, claim: bool = False) -> Opened:
        """``body`` with its ``conversation`` resolved: the input is the conversation's items, then its own
        (which the answer adds to it, ``extend``); also the conversation's id and how many items it had.
        ``previous_response_id`` with it is a 400, as OpenAI's. ``claim``: a response is made in it now,
        until ``Opened.release``; another meanwhile is OpenAI's 400 ``conversation_locked`` (it would
        not see this one's turn)."""
        if not isinstance(body, dict) or body.get("conversation") is None:
            return Opened(body)
        reference = body["conversation"]
        conversation_id = reference.get("id") if isinstance(reference, dict) else reference
        if not isinstance(conversation_id, str):
            raise bad("'conversation' must be a conversation's id, or {\"id\": ...}.", "conversation")
        if body.get("previous_response_id") is not None:
            raise bad("Mutually exclusive parameters: Ensure you are only providing one of: 'previous_response_id' "
                      "or 'conversation'.", "conversation")
        own = input_items(body.get("input"))
        conversation = self.get(conversation_id, "conversation")
        token = object()
        with self._lock:
            if claim and conversation_id in self._busy:
                raise APIError(400, "Another process is currently operating on this conversation. Please retry in "
                               "a few seconds.", param="conversation", code="conversation_locked")
            if claim:
                self._busy[conversation_id] = token
            before = list(conversation.items)
        rest = {key: value for key, value in body.items() if key != "conversation"}
        return Opened({**rest, "input": [*before, *own]}, conversation_id, len(before),
                      functools.partial(self._release, conversation_id, token) if claim else None)

    def _release(self, conversation_id: str, token: object) -> None:
        with self._lock:
            if self._busy.get(conversation_id) is token:  # this claim, not a later one's
                del self._busy[conversation_id]


@dataclass(frozen=True)
class Opened:
    """A Responses request with its conversation resolved (``ConversationStore.opened``)."""

    body: Any
    conversation: str | None = None  # the conversation's id
    before: int = 0  # how many items it had
    _release: Callable[[], None] | None = None

    def release(self) -> None:
        """The response made in the conversation is over (made, failed or cancelled): another may be
        made in it. Only this claim is released, however often or late this is called."""
        if self._release is not None:
            self._release()


def listed(items: list[Any], param: str = "input") -> list[Any]:
    """Items as OpenAI lists them: with an id and a status, a message's text as a content part
    (``input_text``, or ``output_text`` for the assistant's); an item that has an id (a string, else a
    400 naming ``param``) keeps it."""
    return [_listed(item, param) for item in items]


def unique(items: list[Any], param: str = "input") -> list[Any]:
    """``items``, whose ids must differ (each list pages by them): a repeated one is OpenAI's 400."""
    seen: set[str] = set()
    for item in items:
        found = item.get("id") if isinstance(item, dict) else None
        if found in seen:
            raise bad(f"Duplicate item found with id {found}. Remove duplicate items from your input and try again.",
                      param)
        if isinstance(found, str):
            seen.add(found)
    return items


def _listed(item: Any, param: str) -> Any:
    if not isinstance(item, dict):
        return item  # the parser refuses it before a response is made
    if item.get("id") is not None and not (isinstance(item["id"], str) and item["id"]):
        raise bad("an item's 'id' must be a non-empty string (or left out: the server gives one).", param)
    kind = item.get("type", "message")
    shown = {"type": kind, **item, "id": item.get("id") or new_id(ID_PREFIXES.get(kind, "item")),
             "status": item.get("status") or "completed"}
    if kind == "message" and isinstance(item.get("content"), str):
        assistant = item.get("role") == "assistant"
        shown["content"] = [{"type": "output_text", "text": item["content"], "annotations": []} if assistant
                            else {"type": "input_text", "text": item["content"]}]
    return shown


def page_query(query: Mapping[str, str]) -> tuple[str | None, int, str]:
    """A list route's ``after``, ``limit`` (1-100, default 20) and ``order`` ("desc", the default, or
    "asc") from its query string."""
    text = query.get("limit", str(PAGE_LIMIT[0]))
    limit = int(text) if text.isdigit() else 0
    if not 1 <= limit <= PAGE_LIMIT[1]:
        raise bad(f"'limit' must be an integer from 1 to {PAGE_LIMIT[1]}.", "limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad("'order' must be 'asc' or 'desc'.", "order")
    return query.get("after"), limit, order


def item_page(items: list[dict], query: Mapping[str, str], owner: str) -> dict:
    """A page of ``items`` (oldest first), OpenAI's list object, as ``query`` asks (``page_query``): "desc"
    lists the newest first, ``after`` names the item the page follows (an item of ``owner``)."""
    after, limit, order = page_query(query)
    if order == "desc":
        items = items[::-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise bad(f"'after' must be the id of an item of {owner}: it has no item '{after}'.", "after")
        items = items[ids.index(after) + 1:]
    return list_object(items[:limit], has_more=len(items) > limit)


def list_object(page: list[dict], *, has_more: bool) -> dict:
    """OpenAI's list of items: ``data`` with the first and last ids."""
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": has_more}


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
