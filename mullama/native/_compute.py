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

How many threads a context made with ``n_threads="auto"`` uses is measured, not guessed
(:class:`ThreadChoice`): all cores on an idle machine, one when other work wants the same cores.

(A build with OpenMP uses OpenMP's threads instead; the pools then stay idle.)
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .._exceptions import InvalidConfigError

__all__ = ["MAX_THREADS", "THREADS_VARIABLE", "Compute", "ThreadChoice", "available_threads", "default_threads"]


def _load_average() -> float:
    """The system's run queue, averaged over the last minute (0 where the platform does not say)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


THREADS_VARIABLE = "MULLAMA_THREADS"
MAX_THREADS = 512  # GGML_MAX_N_THREADS


def default_threads() -> int:
    """Threads for decoding when none are asked for: ``MULLAMA_THREADS`` when it is set (a whole
    process, its servers and scripts, on one count: e.g. 1 on a machine shared with other work),
    else the CPUs this process may run on (at most 8), as llama-server's default. "auto" contexts
    follow :class:`ThreadChoice` instead."""
    setting = os.environ.get(THREADS_VARIABLE, "").strip()
    if setting:
        if not setting.isdigit() or not 1 <= int(setting) <= MAX_THREADS:
            raise InvalidConfigError(f"{THREADS_VARIABLE} must be a whole number of threads from 1 to {MAX_THREADS}, "
                                     f"not {setting!r}: set it to a count or unset it for all CPUs (at most 8).")
        return int(setting)
    return available_threads()


def available_threads() -> int:
    """The CPUs this process may run on, at most 8: the most threads worth using."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    return max(1, min(available, 8))


class ThreadChoice:
    """How many threads the contexts made with ``n_threads="auto"`` compute with, chosen by timing
    their token steps. (Not the default: llama.cpp's sums depend on the thread count, so greedy
    output can change with it.)

    On an idle machine every core makes a step fastest. When other processes want the same cores,
    ggml's threads wait at each of a step's barriers for one that is not running, and fewer threads
    are faster (2 cores, SmolLM2, llama-bench tg32: idle, 2 threads 251 tok/s and 1 thread 148;
    beside two busy processes, 2 threads 65 and 1 thread 96; beside a test suite, 11 and 41). So
    steps run with the current choice, and now and then a few steps try each other count; the
    fastest by mean time per token (what throughput is made of: a step that waited for a thread
    that was not running counts in full) is kept, and another must be 10% faster to replace it.
    While the choice holds, the probes come further apart; more threads than now are tried only
    while the load average leaves cores free for them.
    """

    FIRST_PROBE = 4  # token steps before the first probe
    PROBE_STEPS = 8  # steps timed per count in a probe, after one that settles
    MIN_PERIOD, MAX_PERIOD = 512, 8192  # steps between probes: after a change, and at most
    MARGIN = 0.9

    def __init__(self, most: int, load: Callable[[], float] = _load_average) -> None:
        self.candidates = tuple(sorted({most, max(1, most // 2), 1}, reverse=True))
        # The count steps run with outside a probe. It starts with one thread: trying more costs a step or
        # two where one thread would have been faster; starting with more than the cores free, many.
        self.current = self.candidates[-1]
        self.estimates: dict[int, float] = {}  # seconds per token, each count's latest mean
        self.probes = 0  # probes finished
        self._load = load
        self._recent: deque[float] = deque(maxlen=self.PROBE_STEPS)  # the current count's last steps
        self._measuring = self.current  # the count the next steps run with
        self._to_probe: list[int] = []  # counts still to try in this probe
        self._round: dict[int, float] = {}  # this probe's means, by count
        self._probe_times: list[float] = []
        self._countdown = self.FIRST_PROBE if len(self.candidates) > 1 else -1
        self._period = self.MIN_PERIOD

    def record(self, seconds: float, n_tokens: int) -> int:
        """Note a token step of ``n_tokens`` tokens that took ``seconds``; the thread count the
        next steps should run with."""
        per_token = seconds / max(1, n_tokens)
        if self._measuring != self.current:
            self._probe_times.append(per_token)
            timed = self._probe_times[1:]  # the first step settles the new count
            # A count that has already taken longer than the current one would for the whole probe cannot
            # win: the probe ends. (Under load one step of two threads took 3 s, against 16 ms for one.)
            spent = sum(self._probe_times)
            if len(timed) >= self.PROBE_STEPS or spent > self.PROBE_STEPS * self._round[self.current]:
                self._round[self._measuring] = statistics.fmean(timed or self._probe_times)
                self._probe_times = []
                self._next_in_probe()
            return self._measuring
        self._recent.append(per_token)
        self._countdown -= 1
        if self._countdown == 0:
            self._round = {self.current: statistics.fmean(self._recent)}
            # More threads than now are tried only where the cores they need are free: beside other
            # work, a single step of two threads on two cores took seconds.
            others = max(0.0, self._load() - self.current)
            self._to_probe = [count for count in self.candidates if count < self.current
                              or (count > self.current and others + count <= self.candidates[0] + 0.5)]
            self._next_in_probe()
        return self._measuring

    def _next_in_probe(self) -> None:
        if self._to_probe:
            self._measuring = self._to_probe.pop(0)
            return
        self.estimates.update(self._round)
        self.probes += 1
        best = min(self._round, key=self._round.__getitem__)
        if best != self.current and self._round[best] < self.MARGIN * self._round[self.current]:
            self.current, self._period = best, self.MIN_PERIOD
            self._recent.clear()
        else:
            self._period = min(2 * self._period, self.MAX_PERIOD)
        self._measuring, self._countdown = self.current, self._period


class Compute:
    """The process's thread pools and the lock that decodes and samplers run under.

    ``lock`` is taken around each ``llama_decode`` and ``llama_sampler_sample`` (sampling
    takes a core too). ``begin()``/``end()``, or ``with busy():``, bracket a stretch of
    decoding (a generation, an engine's busy spell); when the last one ends the pools are
    paused, so idle workers sleep instead of spinning.
    """

    def __init__(self, ffi: Any, lib: Any, most_threads: int) -> None:
        self._ffi, self._lib = ffi, lib
        self.threads = ThreadChoice(most_threads)
        self._adaptive: dict[int, Any] = {}  # address -> context whose thread count follows ``threads``, under lock
        self._applied = self.threads.current
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

    def attach(self, ptr: Any, n_threads: int, n_threads_batch: int, *, adaptive: bool = False) -> None:
        """Make the context ``ptr`` compute on the shared pools for its thread counts; an
        ``adaptive`` one (made with ``n_threads="auto"``: all cores, ``threads``' largest count) then
        runs with as many as ``threads`` chooses, until :meth:`detach`."""
        pool = self._pool(n_threads)
        if pool == self._ffi.NULL:
            return
        batch_pool = pool if n_threads_batch == n_threads else self._pool(n_threads_batch)
        self._lib.llama_attach_threadpool(ptr, pool, batch_pool)
        if adaptive:
            for count in self.threads.candidates:  # made now: _apply runs under ``lock``, _pool takes _state
                self._pool(count)
            with self.lock:
                self._adaptive[int(self._ffi.cast("uintptr_t", ptr))] = ptr
                if self._applied != n_threads:  # made with all cores
                    self._switch(ptr, self._applied)

    def detach(self, ptr: Any) -> None:
        """The context ``ptr`` is about to be freed: its thread count is no longer changed."""
        if self._adaptive:
            with self.lock:
                self._adaptive.pop(int(self._ffi.cast("uintptr_t", ptr)), None)

    def reset_threads(self, choice: ThreadChoice | None = None) -> None:
        """Choose the thread count afresh, with ``choice`` if given (the adaptive contexts follow)."""
        with self.lock:
            self.threads = choice or ThreadChoice(self.threads.candidates[0])
            self._apply(self.threads.current)

    def record(self, seconds: float, n_tokens: int) -> None:
        """A token step of an adaptive context took ``seconds`` (called with ``lock`` held, right
        after the decode): the choice of threads learns from it, and every adaptive context follows."""
        self._apply(self.threads.record(seconds, n_tokens))

    def _apply(self, wanted: int) -> None:
        if wanted != self._applied:
            self._applied = wanted
            for ptr in self._adaptive.values():
                self._switch(ptr, wanted)

    def _switch(self, ptr: Any, n_threads: int) -> None:
        # The pool of that many threads, not fewer threads of a bigger pool: a pool's workers that a
        # graph does not use still wake for it and poll, taking the core the step needs.
        pool = self._pools.get(n_threads)
        if pool is not None:
            self._lib.llama_attach_threadpool(ptr, pool, pool)
        self._lib.llama_set_n_threads(ptr, n_threads, n_threads)

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
        for pool in self._pools.values():  # idle workers sleep instead of polling while the process ends
            self._lib.ggml_threadpool_pause(pool)

    def close(self) -> None:
        """Free the pools (at exit, after every context is freed)."""
        with self._state, self.lock:
            self._closed = True
            for pool in self._pools.values():
                self._lib.ggml_threadpool_free(pool)
            self._pools.clear()
