"""A deadline for prompt decodes: llama.cpp's abort callback, one C callback shared by every context."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["PromptAbort"]


class _State:
    """What the callback looks at (never the context itself)."""

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        self.deadline: float | None = None


_callback: Any = None  # made on first use


def _shared_callback(ffi: Any) -> Any:
    """The ``ggml_abort_callback`` every context uses. Its user data is a handle to that context's
    _State, so no callback refers to a context: a dropped context is freed by refcount."""
    global _callback
    if _callback is None:
        def should_abort(data: Any) -> bool:
            deadline = ffi.from_handle(data).deadline
            return deadline is not None and time.monotonic() > deadline

        _callback = ffi.callback("ggml_abort_callback", should_abort)
    return _callback


class PromptAbort:
    """``with abort.until(deadline):`` a decode on the context ``ptr`` stops (``llama_decode``
    returns 2) once ``time.monotonic()`` passes ``deadline``. Only around prompt decodes: ggml
    polls the callback at every graph node."""

    def __init__(self, ffi: Any, lib: Any, ptr: Any) -> None:
        self._ffi, self._lib, self._ptr = ffi, lib, ptr
        self._state = _State()
        self._handle = ffi.new_handle(self._state)

    @contextmanager
    def until(self, deadline: float | None) -> Iterator[None]:
        if deadline is None:
            yield
            return
        self._state.deadline = deadline
        self._lib.llama_set_abort_callback(self._ptr, _shared_callback(self._ffi), self._handle)
        try:
            yield
        finally:
            self._lib.llama_set_abort_callback(self._ptr, self._ffi.NULL, self._ffi.NULL)
            self._state.deadline = None
