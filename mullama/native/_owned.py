"""Ownership of C objects: free exactly once, promptly on close(), or at garbage collection."""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from .._exceptions import ClosedError, MullamaError

_OwnedT = TypeVar("_OwnedT", bound="Owned")

# Every live C-owning object, so that all can be freed at interpreter exit while the
# Python side (llama.cpp's log callback above all) still exists: freed later, during module
# teardown, llama.cpp would log through a callback that is already gone, and crash.
_live: weakref.WeakSet[Owned] = weakref.WeakSet()

# C objects taken and freed, by kind: the reliability tests check that each is freed exactly once.
owned_count: collections.Counter[str] = collections.Counter()
freed_count: collections.Counter[str] = collections.Counter()


def close_all() -> int:
    """Free every live engine, context and model, in that order (at exit).

    An object that cannot be closed (a context another thread is still decoding with, the
    model under it) is left alone for good: its destructor is detached, so nothing frees
    memory that a thread may still be using while the interpreter shuts down, and that thread
    stops at its next step on it (see :meth:`Owned.ensure_open`). Returns how many were left so.
    """
    left_open = []
    closing = [obj for obj in _live if obj._close_order is not None]
    for obj in sorted(closing, key=lambda o: o._close_order or 0):
        try:
            if obj._used_unguarded and _other_threads_alive():
                raise ClosedError("another thread may be using it")  # tokenising, say: nothing marks that use
            obj.close()
        except MullamaError:  # still busy in another thread: never free it
            obj._detach()
            left_open.append(obj)
    for obj in left_open:  # only now: a model whose context looked closed would be freed under it
        obj._ptr, obj._retired_at_exit = None, True
    return len(left_open)


def _other_threads_alive() -> bool:
    current = threading.current_thread()
    return any(thread is not current and thread.is_alive() for thread in threading.enumerate())


def invalidate_after_fork() -> None:
    """In a forked child, close (without freeing) every context and engine inherited from the parent."""
    for obj in list(_live):
        if obj._kind in ("context", "engine", "embedder") and obj._ptr is not None:
            obj._detach()
            obj._ptr = None
            obj._inherited_by_fork = True


class Owned:
    """Owns one C pointer.

    The pointer is wrapped with ``ffi.gc`` as a safety net; ``close()`` (or ``with``)
    detaches that destructor and frees at once, so each object is freed exactly once
    whichever path runs first.
    """

    _kind = "object"
    _ptr: Any = None
    _inherited_by_fork = False
    _retired_at_exit = False  # left to another thread at interpreter exit, never freed (close_all)
    # At exit: engines (0), then contexts (1), then models (2). None: never closed at exit (a sampler
    # chain may be in use by a stream in another thread; freeing it needs no log callback).
    _close_order: int | None = 1
    # Other threads may call into it without taking any guard (a model they tokenise with): at exit it is
    # freed only when no other thread is left.
    _used_unguarded = False

    def _own(self, ffi: Any, ptr: Any, free: Callable[[Any], None]) -> None:
        def counted_free(p: Any, _free: Callable[..., Any] = free, _kind: str = self._kind,
                         _count: collections.Counter[str] = freed_count) -> None:
            _count[_kind] += 1
            _free(p)

        self._ffi = ffi
        self._free = counted_free
        self._ptr = ffi.gc(ptr, counted_free)
        owned_count[self._kind] += 1
        _live.add(self)

    @property
    def ptr(self) -> Any:
        """The C pointer; raises ClosedError after close()."""
        self.ensure_open()
        return self._ptr

    def ensure_open(self) -> None:
        """Raise ClosedError after close(), and in a thread that reaches an object retired at
        interpreter exit: that thread must stop decoding (the exit waits for the lock its steps take)."""
        if self._ptr is None:
            if self._retired_at_exit:
                raise ClosedError(f"the interpreter is exiting: this {self._kind} was left to the thread using it, "
                                  "and its stream ends here.")
            if self._inherited_by_fork:
                raise ClosedError(f"this {self._kind} was inherited through fork(), where its compute threads do "
                                  f"not exist; create a new one in the child (models can be shared).")
            raise ClosedError(f"this {self._kind} is closed; create a new one to go on.")

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _belong_to_another(self) -> None:
        """This object is a part of another (a draft model's context, drafting for a Context or an
        engine): closed by its owner's close(), never on its own at interpreter exit, when the owner
        may still be using it in another thread (freeing it under that thread crashed)."""
        self._close_order = None

    def _detach(self) -> None:
        """Give up ownership without freeing (the process is ending and the object is in use)."""
        ptr = self._ptr
        if ptr is not None:
            self._ffi.gc(ptr, None)

    def close(self) -> None:
        """Free the C object now. Idempotent."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            self._ffi.gc(ptr, None)
            self._free(ptr)

    def __enter__(self: _OwnedT) -> _OwnedT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
