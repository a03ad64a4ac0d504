"""llama-server's slot routes: ``GET /slots`` (what each of the engine's sequences holds) and
``POST /slots/{id_slot}?action=save|restore|erase`` (a slot's KV state to and from a file of the
``--slot-save-path`` directory), in its shapes.

A slot is one sequence of the model's engine (``--parallel`` of them). Save answers ``{"id_slot",
"filename", "n_saved", "n_written", "timings": {"save_ms"}}``, restore ``{"id_slot", "filename",
"n_restored", "n_read", "timings": {"restore_ms"}}``, erase ``{"id_slot", "n_erased"}``. A busy slot
is acted on when its request ends, as llama-server defers it. Without ``--slot-save-path`` every
action is refused with llama-server's 501 (erase too, as llama-server does). A ``filename`` is
checked by llama-server's rules (``fs_validate_filename``: no separator, no ``..``, no control or
reserved character, at most 255 bytes) and the path is checked once more to stay inside the
directory, so no request names a file elsewhere. The file format is mullama's
(mullama.generate._state): it records the model, and a file of another model is refused (400).
On a server of several models, ``?model=`` (or the body's ``model``) picks the model, as
llama-server's router does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._exceptions import ContextOverflowError, EngineError, MullamaError, StateError
from ..generate import _slots
from ._http import endpoint, named_model, read_json, state
from ._llama_server_shapes import LLAMA_SERVER
from ._pool import Served
from ._request import APIError, generation_error
from ._workers import ADMIN

__all__ = ["check_filename", "get_slots", "post_slot"]

_RESERVED = set(':*?"<>|/\\')
_FORBIDDEN = {0x7F, 0xFF0E, 0x2215, 0x2216, 0xFFFD, 0xFEFF}


def check_filename(directory: Path, filename: Any) -> Path:
    """``directory / filename`` when ``filename`` passes llama-server's ``fs_validate_filename`` (without
    sub-directories) and the path stays inside ``directory``; APIError 400 "Invalid filename" otherwise."""
    invalid = APIError(400, "Invalid filename")
    if not isinstance(filename, str) or not filename or len(filename.encode("utf-8", "surrogatepass")) > 255:
        raise invalid
    for char in filename:
        code = ord(char)
        if code <= 0x1F or 0x80 <= code <= 0x9F or 0xD800 <= code <= 0xDFFF or code in _FORBIDDEN \
                or char in _RESERVED:
            raise invalid
    if filename[0] == " " or filename[-1] in " ." or ".." in filename:
        raise invalid
    base = directory.resolve()
    path = (base / filename).resolve()
    if path.parent != base:  # a symlink or anything else leading out of the directory
        raise invalid
    return path


def _engine(served: Served) -> Any:
    if served.engine is None:
        raise APIError(501, "This server does not support slots: its model only computes embeddings.",
                       type="not_supported_error")
    return served.engine


@endpoint(LLAMA_SERVER)
async def get_slots(request: Request) -> Response:
    """Each slot of the model's engine, as llama-server's ``GET /slots`` (``?fail_on_no_slot=1``: 503
    when none is idle)."""
    server = state(request)
    async with await server.pool.lease(named_model(request, None)) as served:
        slots = _slots.slot_info(_engine(served))
    if request.query_params.get("fail_on_no_slot") and all(slot["is_processing"] for slot in slots):
        raise APIError(503, "no slot available", type="unavailable_error")
    return JSONResponse(slots)


@endpoint(LLAMA_SERVER)
async def post_slot(request: Request) -> Response:
    """``POST /slots/{id_slot}?action=save|restore|erase`` (llama-server's checks, in its order)."""
    server = state(request)
    directory = server.settings.slot_save_path
    if directory is None:
        raise APIError(501, "This server does not support slots action. Start it with `--slot-save-path`",
                       type="not_supported_error")
    try:
        id_slot = int(request.path_params["id_slot"])
    except ValueError:
        raise APIError(400, "Invalid slot ID") from None
    action = request.query_params.get("action")
    if action not in ("save", "restore", "erase"):
        raise APIError(400, "Invalid action")
    body: Any = None
    path = directory  # replaced by the file's path for save and restore
    if action != "erase":
        body = await read_json(request)
        if not isinstance(body, dict) or "filename" not in body:
            raise APIError(400, "\"filename\" is required: the name of a file in the --slot-save-path directory.",
                           param="filename")
        path = check_filename(directory, body["filename"])
    async with await server.pool.lease(named_model(request, body)) as served:
        engine = _engine(served)
        try:
            if action == "save":
                answer = await ADMIN.run(_slots.save_slot, engine, id_slot, path)
            elif action == "restore":
                if not path.is_file():
                    raise APIError(400, "Unable to restore slot: no such file in the slot directory.")
                answer = await ADMIN.run(_slots.restore_slot, engine, id_slot, path)
            else:
                answer = await ADMIN.run(_slots.erase_slot, engine, id_slot)
        except _slots.SlotNotFoundError:
            raise APIError(400, "Invalid slot ID") from None
        except (StateError, ContextOverflowError) as exc:
            if action == "save":
                raise APIError(500, f"Unable to save slot: {exc}", type="server_error") from None
            raise APIError(400, f"Unable to restore slot: {exc}") from None
        except EngineError as exc:
            raise generation_error(exc) from None
        except MullamaError as exc:
            raise APIError(400, str(exc)) from None
    return JSONResponse(answer)
