"""OpenAI's Conversations API (``/v1/conversations``): conversations to create, read, label and delete,
and their items to add, list, read and remove. A Responses request's ``conversation`` continues one
(its items, then the request's input) and adds its input and output to it (``_responses``); clients
that keep a session there (openai-agents' ``OpenAIConversationsSession``) add and list items
themselves. Kept in the server's memory (``_response_store.ConversationStore``), as stored responses
are; items are checked as a Responses request's input is, and listed as OpenAI lists them.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._http import endpoint, read_json, state
from ._openai_shapes import OPENAI
from ._request import APIError, bad
from ._response_store import MAX_NEW_ITEMS, Conversation, item_page, list_object
from ._responses import input_messages

__all__ = ["create", "create_items", "delete", "delete_item", "list_items", "retrieve", "retrieve_item", "update"]

MAX_METADATA = 16  # key-value pairs, as OpenAI's


@endpoint(OPENAI)
async def create(request: Request) -> Response:
    """``POST /v1/conversations``: a new conversation, with up to 20 first ``items`` and ``metadata``."""
    body = await _object(request)
    items = _new_items(body.get("items") or [])
    conversation = state(request).conversations.create(items, _metadata(body.get("metadata")))
    return JSONResponse(conversation.body())


@endpoint(OPENAI)
async def retrieve(request: Request) -> Response:
    return JSONResponse(_conversation(request).body())


@endpoint(OPENAI)
async def update(request: Request) -> Response:
    """``POST /v1/conversations/{id}``: its ``metadata`` replaced."""
    conversation, metadata = await _conversation_and(request, "metadata", "the conversation's new key-value pairs")
    conversation.metadata = _metadata(metadata)
    return JSONResponse(conversation.body())


@endpoint(OPENAI)
async def delete(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    state(request).conversations.delete(conversation_id)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


@endpoint(OPENAI)
async def create_items(request: Request) -> Response:
    """``POST /v1/conversations/{id}/items``: up to 20 ``items`` added at its end; the list of them."""
    conversation, items = await _conversation_and(request, "items", "a list of up to 20 items to add")
    added = state(request).conversations.extend(conversation.id, _new_items(items))
    return JSONResponse(list_object(added, has_more=False))


@endpoint(OPENAI)
async def list_items(request: Request) -> Response:
    """``GET /v1/conversations/{id}/items``: a page of its items (``limit``, ``order``, ``after``)."""
    conversation = _conversation(request)
    return JSONResponse(item_page(list(conversation.items), request.query_params,
                                  f"conversation '{conversation.id}'"))


@endpoint(OPENAI)
async def retrieve_item(request: Request) -> Response:
    return JSONResponse(_conversation(request).item(request.path_params["item_id"]))


@endpoint(OPENAI)
async def delete_item(request: Request) -> Response:
    """``DELETE /v1/conversations/{id}/items/{item_id}``: the item removed; the conversation."""
    conversations = state(request).conversations
    conversation = conversations.remove_item(request.path_params["conversation_id"], request.path_params["item_id"])
    return JSONResponse(conversation.body())


def _conversation(request: Request) -> Conversation:
    return state(request).conversations.get(request.path_params["conversation_id"])


async def _conversation_and(request: Request, field: str, meaning: str) -> tuple[Conversation, Any]:
    """The conversation the path names and the body's required ``field``."""
    conversation = _conversation(request)
    body = await _object(request)
    if field not in body:
        raise bad(f"'{field}' is required: {meaning}.", field)
    return conversation, body[field]


async def _object(request: Request) -> dict:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    return body


def _new_items(items: Any) -> list[dict]:
    """Items to add, checked as a Responses request's input (a 400 naming ``items``)."""
    if not isinstance(items, list) or len(items) > MAX_NEW_ITEMS:
        raise bad(f"'items' must be a list of at most {MAX_NEW_ITEMS} items (add more in further requests).",
                  "items")
    try:
        input_messages(items)
    except APIError as exc:
        raise bad(exc.message.replace("input[", "items[", 1), "items") from None
    return items


def _metadata(value: Any) -> dict:
    """OpenAI's metadata: at most 16 string keys (64 characters) and string values (512)."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_METADATA or not all(
            isinstance(key, str) and len(key) <= 64 and isinstance(text, str) and len(text) <= 512
            for key, text in value.items()):
        raise bad(f"'metadata' must be an object of at most {MAX_METADATA} string keys (up to 64 characters) and "
                  "string values (up to 512).", "metadata")
    return value
