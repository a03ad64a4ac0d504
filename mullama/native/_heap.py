"""Giving freed memory back to the system.

glibc keeps the heap pages that a freed model, context or sampler leaves behind in its arenas (one
per thread that allocated), so a process that loads and unloads models — a server swapping models
with ``--max-loaded`` — grows with every swap. ``malloc_trim(0)`` returns the free pages of every
arena. Elsewhere (musl, macOS) there is no such call and nothing to do.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

__all__ = ["give_back_memory"]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    import cffi  # type: ignore[import-untyped]

    ffi = cffi.FFI()
    ffi.cdef("int malloc_trim(size_t pad);")
    try:
        return ffi.dlopen(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def give_back_memory() -> None:
    """Return the C heap's free pages to the system (glibc), after freeing something large."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
