"""``/v1/ws``: a WebSocket streaming protocol. Send a JSON text frame with ``prompt`` or ``messages``
(and OpenAI's sampling fields); receive ``{"type": "token", "text", "id"}`` frames, then ``done``
with the finish reason and usage. ``{"type": "cancel"}`` stops the stream in flight. A message larger
than the request-body limit closes the connection with 1009 (message too big), a binary frame with
1003 (unsupported data)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from .._exceptions import MullamaError
from ._generation import prepare
from ._http import parse_json, submit_in_all
from ._openai import parse_request
from ._openai_shapes import error_body, usage
from ._request import APIError

__all__ = ["websocket"]


async def websocket(ws: WebSocket) -> None:
    server = ws.app.state.mullama
    if not server.authorized(ws.headers):
        await ws.close(code=1008, reason="missing or wrong API key")
        return
    await ws.accept()
    current: asyncio.Task | None = None
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            limit = server.settings.max_body_bytes
            if _message_bytes(message) > limit:  # (uvicorn's ws_max_size, as mullama serve sets it, does the same)
                await ws.close(code=1009, reason=f"a message is larger than {limit} bytes")
                break
            if message.get("text") is None:  # a binary frame: not this protocol
                await ws.close(code=1003, reason="send JSON in text frames")
                break
            try:
                data = parse_json(message["text"])
            except APIError as exc:
                await ws.send_json({"type": "error", "status": 400, **error_body(exc)})
                continue
            if isinstance(data, dict) and data.get("type") == "cancel":
                if current is not None and not current.done():
                    current.cancel()
                continue
            if current is not None and not current.done():
                await ws.send_json({"type": "error", "error": {
                    "message": "a request is still streaming; send {\"type\": \"cancel\"} first."}})
                continue
            current = asyncio.create_task(_stream(ws, data))
    except WebSocketDisconnect:
        pass
    finally:
        if current is not None and not current.done():
            current.cancel()


def _message_bytes(message: Mapping[str, Any]) -> int:
    """The size of a received message in bytes, as the limit on request bodies counts them (a text
    frame's UTF-8)."""
    text = message.get("text")
    if text is None:
        return len(message.get("bytes") or b"")
    return len(text.encode("utf-8", "surrogatepass"))


async def _stream(ws: WebSocket, data: Any) -> None:
    server = ws.app.state.mullama
    job = None
    try:
        if not isinstance(data, dict):
            raise APIError(400, "send a JSON object with 'prompt' or 'messages'.")
        data = {k: v for k, v in data.items() if k != "type"}
        kind = "chat" if "messages" in data else "completion"
        data.pop("stream", None)
        parsed = parse_request(data, kind, max_tokens_limit=server.settings.max_tokens_limit)
        if parsed.n != 1:
            raise APIError(400, "the WebSocket streams one choice: send n = 1.", param="n")
        async with await server.pool.lease(parsed.model) as served:
            job = (await submit_in_all(lambda: prepare(served, parsed, server.settings)))[0]
            while (token := await job.next_token()) is not None:
                await ws.send_json({"type": "token", "text": token.text, "id": token.id})
        await ws.send_json({"type": "done", "finish_reason": job.finish_reason,
                            "usage": usage(job.prompt_tokens, job.completion_tokens)})
        server.metrics.finished(job.completion_tokens)
    except APIError as exc:
        await ws.send_json({"type": "error", "status": exc.status, **error_body(exc)})
    except MullamaError as exc:
        await ws.send_json({"type": "error", **error_body(APIError(500, str(exc), type="server_error",
                                                                   code=exc.code.lower()))})
    except asyncio.CancelledError:
        if job is not None:
            job.cancel()
        with contextlib.suppress(Exception):
            await ws.send_json({"type": "cancelled"})
        raise
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        if job is not None:
            job.cancel()
