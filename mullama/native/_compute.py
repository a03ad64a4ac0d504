"""llama.cpp's CPU compute, shared by every context in the process.

Each decode runs its graph on a persistent ggml thread pool (as upstream's tools attach
them; without one ggml starts and joins its worker threads on every decode). Contexts
share one pool per thread count, and decodes take turns under one lock. On a CPU two
contexts computing at once only fight over the same cores, and ggml's idle workers spin
for a while waiting for more work: with a pool per context, three concurrent streams on
two cores ran at a sixth of one stream's speed in total. Taking turns keeps every step
at full speed and the aggregate equal to one stream's.

This is a policy, decided in one place (:meth:`Compute.lock_for`): contexts whose model
runs on the CPU take turns; a model whose layers are offloaded to a GPU computes there,
so its contexts do not wait for the CPU's turn (they get a lock that never blocks).

(A build with OpenMP uses OpenMP's threads instead; the pools then stay idle.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Compute"]


class Compute:
    """The process's thread pools and the lock that decodes and samplers run under.

    ``lock`` is taken around each ``llama_decode`` and ``llama_sampler_sample`` (sampling
    takes a core too). ``begin()``/``end()``, or ``with busy():``, bracket a stretch of
    decoding (a generation, an engine's busy spell); when the last one ends the pools are
    paused, so idle workers sleep instead of spinning.
    """

    def __init__(self, ffi: Any, lib: Any) -> None:
        self._ffi, self._lib = ffi, lib
        # Reentrant: a generator finalised by the garbage collector inside a ``with lock`` block
        # of the same thread runs end(), which takes the lock too.
        self.lock = threading.RLock()
        self._state = threading.Lock()  # guards the fields below; taken before ``lock``, never after
        self._pools: dict[int, Any] = {}
        self._users = 0
        self._closed = False

    def lock_for(self, offloaded: bool) -> contextlib.AbstractContextManager[Any]:
        """The lock that decodes and samples of a model's contexts take: the shared one on the
        CPU, none (a lock that never blocks) when the model's layers are ``offloaded`` to a GPU."""
        return contextlib.nullcontext() if offloaded else self.lock

    def attach(self, ptr: Any, n_threads: int, n_threads_batch: int) -> None:
        """Make the context ``ptr`` compute on the shared pools for its thread counts."""
        pool = self._pool(n_threads)
        if pool == self._ffi.NULL:
            return
        batch_pool = pool if n_threads_batch == n_threads else self._pool(n_threads_batch)
        self._lib.llama_attach_threadpool(ptr, pool, batch_pool)

    def _pool(self, n_threads: int) -> Any:
        with self._state:
            if self._closed:
                return self._ffi.NULL
            pool = self._pools.get(n_threads)
            if pool is None:
                params = self._ffi.new("struct ggml_threadpool_params *",
                                       self._lib.ggml_threadpool_params_default(n_threads))
                params.paused = True  # woken by the first decode
                pool = self._lib.ggml_threadpool_new(params)
                if pool != self._ffi.NULL:
                    self._pools[n_threads] = pool
            return pool

    def begin(self) -> None:
        """A stretch of decoding starts."""
        with self._state:
            self._users += 1

    @contextmanager
    def busy(self) -> Iterator[None]:
        """``begin()`` now, ``end()`` when the block is left, however it is left."""
        self.begin()
        try:
            yield
        finally:
            self.end()

    def end(self) -> None:
        """A stretch of decoding ended; pause the pools when nobody else decodes."""
        with self._state:
            self._users -= 1
            if self._users == 0 and not self._closed:
                with self.lock:
                    for pool in self._pools.values():
                        self._lib.ggml_threadpool_pause(pool)

    def abandon_after_fork(self) -> None:
        """In a forked child: forget the parent's pools (their threads are not here: freeing them
        would wait forever) and its locks (a thread that is not here may hold them)."""
        self.lock = threading.RLock()
        self._state = threading.Lock()
        self._pools = {}
        self._users = 0

    def hold_for_exit(self) -> None:
        """At interpreter exit, while other threads still hold contexts: wait for the decode in
        progress to end, then keep the lock for good. No thread computes while Python and the C
        library's static objects are torn down (one inside a decode could touch what is being torn down);
        a thread that tries blocks until the process is gone. (Offloaded models' contexts take no
        lock: a GPU decode in another thread at exit is not covered.)"""
        with self._state:
            self._closed = True  # no new pools; end() no longer takes the lock
        self.lock.acquire()

    def close(self) -> None:
        """Free the pools (at exit, after every context is freed)."""
        with self._state, self.lock:
            self._closed = True
            for pool in self._pools.values():
                self._lib.ggml_threadpool_free(pool)
            self._pools.clear()
