"""llama-server's LoRA routes and field: ``GET /lora-adapters`` (each adapter's ``id``, ``path``, ``scale``,
``task_name``, ``prompt_prefix``), ``POST /lora-adapters`` (a list of ``{"id", "scale"}``: the scales
every later request without its own ``lora`` uses; adapters not listed go to 0; answers
``{"success": true}``), and a request's ``lora`` field (the same list, for that request alone).

The adapters are the ones ``mullama serve --lora FNAME`` / ``--lora-scaled FNAME:SCALE`` loaded, in that
order (their index is the ``id``); ``--lora-init-without-apply`` loads them at scale 0, for a later POST.
The engine decodes sequences with different adapter sets in different batches (mullama.generate._lora).
On a server of several models, ``?model=`` (or the body's ``model``) picks the model.
"""

from __future__ import annotations

import struct
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._http import endpoint, named_model, read_json, state
from ._llama_server_shapes import LLAMA_SERVER
from ._request import APIError, bad

__all__ = ["get_lora_adapters", "parse_lora", "post_lora_adapters"]

MAX_ADAPTERS = 256


def parse_lora(value: Any) -> dict[int, float]:
    """A request's ``lora`` list as ``{id: scale}`` (llama-server's parse_lora_request: ``id`` -1 and
    ``scale`` 0 when missing); a 400 when it is not a list of objects."""
    if not isinstance(value, list) or len(value) > MAX_ADAPTERS or not all(isinstance(e, dict) for e in value):
        raise bad("Error: 'lora' must be an array of objects with 'id' and 'scale' fields", "lora")
    scales: dict[int, float] = {}
    for entry in value:
        adapter_id, scale = entry.get("id", -1), entry.get("scale", 0.0)
        if isinstance(adapter_id, bool) or not isinstance(adapter_id, int):
            raise bad("Error: a 'lora' entry's 'id' must be an integer", "lora")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
            raise bad("Error: a 'lora' entry's 'scale' must be a number", "lora")
        scales[adapter_id] = float(scale)
    return scales


def _describe(adapter: Any) -> dict[str, Any]:
    meta = adapter.metadata
    scale = struct.unpack("f", struct.pack("f", adapter.scale))[0]  # llama-server's float, as llama.cpp applies it
    return {"id": adapter.id, "path": str(adapter.path), "scale": scale,
            "task_name": meta.get("adapter.lora.task_name", ""),
            "prompt_prefix": meta.get("adapter.lora.prompt_prefix", "")}


@endpoint(LLAMA_SERVER)
async def get_lora_adapters(request: Request) -> Response:
    """The model's adapters and their current scales, as llama-server's ``GET /lora-adapters``."""
    async with await state(request).pool.lease(named_model(request, None)) as served:
        model = served.model
        assert model is not None  # a lease holds a loaded model
        return JSONResponse([_describe(adapter) for adapter in model.lora])


@endpoint(LLAMA_SERVER)
async def post_lora_adapters(request: Request) -> Response:
    """Set the adapters' scales for requests without their own ``lora`` (llama-server's
    ``POST /lora-adapters``: ids not listed go to 0, unknown ids are ignored)."""
    body = await read_json(request)
    if not isinstance(body, list):
        raise APIError(400, "Request body must be an array")
    scales = parse_lora(body)
    async with await state(request).pool.lease(named_model(request, None)) as served:
        assert served.model is not None
        for adapter in served.model.lora:
            adapter.scale = scales.get(adapter.id, 0.0)
    return JSONResponse({"success": True})
