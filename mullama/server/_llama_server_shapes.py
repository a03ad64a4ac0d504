"""llama-server's own shapes, for the routes only it has (``/infill``, ``/rerank``): its error body
``{"error": {"code", "message", "type"}}``, also as an SSE event."""

from __future__ import annotations

import json

from ._http import WireFormat
from ._request import APIError

__all__ = ["LLAMA_SERVER"]


def error_body(exc: APIError) -> dict:
    """llama-server's error shape."""
    return {"error": {"code": exc.status, "message": exc.message, "type": exc.type}}


def error_event(exc: APIError) -> str:
    return f"data: {json.dumps(error_body(exc), ensure_ascii=False)}\n\n"


LLAMA_SERVER = WireFormat(error_body, error_event)
