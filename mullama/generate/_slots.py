"""The engine's slots seen from outside: what each holds (llama-server's ``GET /slots``), and saving,
restoring and erasing one slot's KV state (``POST /slots/{id}?action=save|restore|erase``).

A slot is one sequence of the engine's shared context. Its state is read and written on the
engine's own thread, between two steps (``Engine.run_between_steps``), and only while no request
is using the slot: an action on a busy slot waits until its request ends, as llama-server defers
it. The file is written and read (and checked) outside that thread, so a save or restore holds
the other sequences up only for the copy of the state itself. A restored slot holds the file's
tokens; the engine gives a new request the free slot whose cache shares the most with its prompt,
so a request that starts with them lands on that slot and decodes only what follows.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

from .._exceptions import EngineError, InvalidConfigError, detached
from . import _state
from ._engine import Engine

__all__ = ["SlotNotFoundError", "erase_slot", "restore_slot", "save_slot", "slot_info"]


class SlotNotFoundError(InvalidConfigError):
    """No slot has this id (llama-server: "Invalid slot ID")."""


def _slot(engine: Engine, id_slot: int) -> Any:
    """The slot ``id_slot`` names: llama-server's rule, an id past the last wraps around."""
    if isinstance(id_slot, bool) or not isinstance(id_slot, int) or id_slot < 0:
        raise SlotNotFoundError("Invalid slot ID")
    return engine._slots[id_slot % engine.parallel]


def slot_info(engine: Engine) -> list[dict[str, Any]]:
    """Each slot as llama-server's ``GET /slots`` shows it (without the debug fields)."""
    slots = []
    for slot in engine._slots:
        request = slot.request
        info: dict[str, Any] = {"id": slot.seq_id, "n_ctx": engine.n_ctx_per_slot, "speculative": False,
                                "is_processing": request is not None, "n_cached_tokens": len(slot.cached)}
        if request is not None:
            sequence = request._sequence
            limit = sequence.config.max_tokens
            info.update({
                "id_task": request.id,
                "n_prompt_tokens": len(sequence.prompt_tokens),
                "n_prompt_tokens_cache": sequence.cached_tokens,
                "next_token": [{"has_next_token": sequence.finish_reason is None, "has_new_line": False,
                                "n_remain": -1 if limit is None else max(0, limit - sequence.n_tokens),
                                "n_decoded": sequence.n_tokens}],
            })
        slots.append(info)
    return slots


def _between_steps(engine: Engine, id_slot: int, work: Any) -> concurrent.futures.Future[Any]:
    """Run ``work(slot)`` on the engine's thread once slot ``id_slot`` is free; its result (or error)
    in the Future."""
    slot = _slot(engine, id_slot)
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def action() -> bool:
        if future.cancelled():
            return True
        if slot.request is not None:
            return False  # busy: try again after the next step
        try:
            with engine._lock:
                future.set_result(work(slot))
        except BaseException as exc:  # noqa: BLE001 - the engine's thread must not raise; the caller gets it
            future.set_exception(detached(exc))  # without this thread's frames (they hold the engine)
        return True

    engine.run_between_steps(action)
    return future


def _wait(engine: Engine, future: concurrent.futures.Future[Any], timeout: float | None) -> Any:
    """The action's result, waiting at most ``timeout`` seconds (None: as long as the engine lives)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        wait = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
        try:
            return future.result(wait)
        except concurrent.futures.TimeoutError:
            if not engine.alive:
                future.cancel()
                raise EngineError("the engine stopped before the slot was free; restart it (or the server).") \
                    from None
            if deadline is not None and time.monotonic() >= deadline:
                future.cancel()
                raise


def save_slot(engine: Engine, id_slot: int, path: str | Path, *, timeout: float | None = None) -> dict[str, Any]:
    """Write slot ``id_slot``'s tokens and KV state to ``path`` (atomically). Returns llama-server's
    answer: ``id_slot``, ``filename``, ``n_saved`` (tokens), ``n_written`` (bytes), ``timings.save_ms``."""
    started = time.perf_counter()
    future = _between_steps(engine, id_slot, lambda slot: (
        len(slot.cached), _state.sequence_state(engine.model, engine.ptr, slot.seq_id, list(slot.cached),
                                                slot.lora, slot.positions)))
    n_tokens, data = _wait(engine, future, timeout)
    written = _state.write_atomically(path, data)
    return {"id_slot": id_slot, "filename": Path(path).name, "n_saved": n_tokens, "n_written": written,
            "timings": {"save_ms": (time.perf_counter() - started) * 1000.0}}


def restore_slot(engine: Engine, id_slot: int, path: str | Path, *, timeout: float | None = None) -> dict[str, Any]:
    """Replace slot ``id_slot``'s cache by the state in ``path`` (checked: see mullama.generate._state).
    Returns llama-server's answer: ``id_slot``, ``filename``, ``n_restored`` (tokens), ``n_read``
    (bytes), ``timings.restore_ms``. A refused file leaves the slot as it was; one llama.cpp cannot
    take leaves it empty."""
    started = time.perf_counter()
    _slot(engine, id_slot)
    data = _state.read_state_file(path, limit=(engine.n_ctx_per_slot + 1) << 20)
    source = Path(path).name
    tokens, state, lora = _state.unpack_state(data, engine.model, n_ctx=engine.n_ctx_per_slot, source=source)

    def restore(slot: Any) -> int:
        slot.forget_cache()
        _state.set_sequence(engine.model, engine.ptr, slot.seq_id, tokens, state, source=source)
        slot.cached, slot.lora = list(tokens), lora  # requests with these adapters reuse it
        return len(tokens)

    n_tokens = _wait(engine, _between_steps(engine, id_slot, restore), timeout)
    return {"id_slot": id_slot, "filename": source, "n_restored": n_tokens, "n_read": len(data),
            "timings": {"restore_ms": (time.perf_counter() - started) * 1000.0}}


def erase_slot(engine: Engine, id_slot: int, *, timeout: float | None = None) -> dict[str, Any]:
    """Forget slot ``id_slot``'s cache. Returns llama-server's answer: ``id_slot``, ``n_erased``."""

    def erase(slot: Any) -> int:
        erased = len(slot.cached)
        engine._lib.llama_memory_seq_rm(engine._memory, slot.seq_id, -1, -1)
        slot.forget_cache()
        return erased

    return {"id_slot": id_slot, "n_erased": _wait(engine, _between_steps(engine, id_slot, erase), timeout)}
