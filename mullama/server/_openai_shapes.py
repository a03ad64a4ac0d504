"""OpenAI's response shapes: chat and text completion bodies and stream chunks, token logprobs,
usage, tool-call deltas, and OpenAI's error body — which the other routes of OpenAI's API family
(the Responses API, embeddings, models) and the WebSocket answer errors with too."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from ..generate._config import StreamConfig
from ..generate._engine import EngineRequest
from ..generate._sequence import Token
from ._http import SSE, WireFormat
from ._request import APIError
from ._token_logprobs import Piece, carrying, described_tokens, logprob_entries
from ._tool_calls import CallArguments, CallStart

__all__ = ["OPENAI", "Choice", "Piece", "chunk", "completion_body", "described_tokens", "error_body", "error_event",
           "logprob_entries", "logprobs_body", "new_id", "prediction_usage", "tool_call_delta", "usage", "usage_chunk"]


def error_body(exc: APIError) -> dict:
    """OpenAI's error shape for a refused request (or a failed stream)."""
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def error_event(exc: APIError) -> str:
    """The event that ends a stream on an error: the error body as a ``data:`` event."""
    return f"data: {json.dumps(error_body(exc), ensure_ascii=False)}\n\n"


OPENAI = WireFormat(error_body, error_event, SSE)


def tool_call_delta(event: CallStart | CallArguments) -> dict:
    """A tool-call event as an entry of ``delta.tool_calls``: the call's index, id, type and name
    first, then its arguments in pieces, as OpenAI streams them."""
    if isinstance(event, CallStart):
        return {"index": event.index, "id": event.id, "type": "function",
                "function": {"name": event.name, "arguments": ""}}
    return {"index": event.index, "function": {"arguments": event.text}}


def function_call_delta(event: CallStart | CallArguments) -> dict:
    """A tool-call event as ``delta.function_call`` (OpenAI's deprecated form, one call): the name
    first, then the arguments in pieces."""
    if isinstance(event, CallStart):
        return {"name": event.name, "arguments": ""}
    return {"arguments": event.text}


def logprobs_body(kind: str, tokens: list[Token] | None, piece: Piece, offset: int = 0) -> dict | None:
    """The ``logprobs`` of a choice for ``tokens`` (those that carry logprobs and have text: see
    ``carrying``), or None when they carry none. ``offset``: where the text of ``tokens`` starts in the
    choice's (a completion's ``text_offset``, for a stream's pieces)."""
    kept = carrying(tokens, piece)
    if not kept:
        return None
    if kind == "chat":
        return {"content": logprob_entries(kept, piece), "refusal": None}
    texts = [piece(t.id).decode("utf-8", "replace") for t in kept]
    offsets = []  # where each token's text starts (a token held back with a later one has its own place)
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts,
            "token_logprobs": [t.logprob for t in kept],
            "top_logprobs": [{top.text: top.logprob for top in t.top_logprobs} for t in kept],
            "text_offset": offsets}


def echo_logprobs(tokens: list[Token], piece: Piece, offset: int = 0) -> dict:
    """A completion's ``logprobs`` with ``echo``: every token (the prompt's, then the generated ones, end
    of generation included, so that a client counts them by position as evals do), the prompt's first
    with null logprobs, as OpenAI's legacy models and vLLM answer."""
    texts = [piece(t.id).decode("utf-8", "replace") for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [None if t.logprob is None else {top.text: top.logprob for top in t.top_logprobs}
                             for t in tokens],
            "text_offset": offsets}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, predicted: dict | None = None) -> dict:
    """OpenAI's usage, with the prompt tokens taken from the KV cache (reused or restored), and for a
    request with a predicted output its ``completion_tokens_details`` (``prediction_usage``)."""
    body = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if predicted is not None:
        body["completion_tokens_details"] = predicted
    return body


def prediction_usage(config: StreamConfig, jobs: list[EngineRequest]) -> dict | None:
    """OpenAI's accepted and rejected prediction tokens, for a request with a ``prediction``: the drafted
    tokens (from the prediction or the context) the answers kept, and those they did not."""
    if config.prediction is None:
        return None
    accepted = sum(job.draft_accepted for job in jobs)
    return {"accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": sum(job.draft_proposed for job in jobs) - accepted}


def chunk(kind: str, request_id: str, model: str, created: int, *, text: str | None = None,
          role: bool = False, finish_reason: str | None = None, logprobs: dict | None = None,
          index: int = 0, tool_call: dict | None = None, reasoning: str | None = None,
          function_call: dict | None = None) -> dict:
    """One streamed chunk of choice ``index``: the role, a piece of text (and the logprobs of its
    tokens), a piece of a tool call (``delta.tool_calls``, or the deprecated ``delta.function_call``),
    or the final finish_reason."""
    if kind == "chat":
        delta: dict = {}
        if role:
            delta = {"role": "assistant", "content": text}  # OpenAI's "" (None before calls alone)
        elif tool_call is not None:
            delta = {"tool_calls": [tool_call]}
        elif function_call is not None:
            delta = {"function_call": function_call}
        elif reasoning is not None:
            delta = {"reasoning_content": reasoning}
        elif text is not None:
            delta = {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice]}
    choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    return {"id": request_id, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: str, request_id: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int, cached_tokens: int = 0, predicted: dict | None = None) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens, predicted)}


@dataclass
class Choice:
    """One finished choice of a non-streamed answer."""

    text: str
    finish_reason: str
    logprobs: dict | None = None
    tool_calls: list[dict] | None = None
    reasoning: str | None = None
    function_call: dict | None = None  # the deprecated form's one call: {name, arguments}


def completion_body(kind: str, request_id: str, model: str, choices: list[Choice], prompt_tokens: int,
                    completion_tokens: int, cached_tokens: int = 0, predicted: dict | None = None) -> dict:
    created = int(time.time())
    if kind == "chat":
        items = [{"index": i, "message": _message(c), "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                 for i, c in enumerate(choices)]
        obj = "chat.completion"
    else:
        items = [{"index": i, "text": c.text, "logprobs": c.logprobs, "finish_reason": c.finish_reason}
                 for i, c in enumerate(choices)]
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": items,
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens, predicted)}


def _message(choice: Choice) -> dict:
    """The assistant message of a chat choice: content, its thought (``reasoning_content``), and its
    tool calls (content null when there is no text besides them)."""
    message: dict[str, Any] = {"role": "assistant", "content": choice.text}
    if choice.reasoning:
        message["reasoning_content"] = choice.reasoning
    if choice.tool_calls:
        message["content"] = choice.text or None
        message["tool_calls"] = choice.tool_calls
    if choice.function_call:
        message["content"] = choice.text or None
        message["function_call"] = choice.function_call
    return message
