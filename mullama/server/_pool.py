"""The models a server answers for: each loaded on first use (concurrent first requests share one
load), kept warm while used, unloaded after ``keep_alive`` idle seconds, or — least recently used
first — when ``max_loaded`` models or ``max_memory`` bytes would be exceeded.

A request holds a lease on its model until its answer is complete (a streamed one until its body
ends, or is dropped unstarted); the engine's own queue counts as use too. A model is unloaded only
when it holds no lease and its engine has nothing to do, so a swap never cuts a request short.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import re
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._exceptions import InvalidConfigError, ModelLoadError, MullamaError
from ..generate._context_params import kv_cache_bytes
from ..generate._engine import Engine
from ..generate._model import Model
from ._keep_alive import DEFAULT_KEEP_ALIVE, UNSET
from ._request import APIError
from ._specs import ModelSpec
from ._workers import ADMIN

__all__ = ["Lease", "ModelPool", "Served"]

TICK = 0.25  # seconds between checks for idle models
T = TypeVar("T")

# A name /api/copy may give: ollama's characters ([host/][namespace/]model[:tag]), never a path or a URL.
_NAME_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_COPY_NAME = re.compile(rf"{_NAME_PART}(/{_NAME_PART}){{0,2}}(:{_NAME_PART})?")


@dataclass(eq=False)
class Served:
    """One model of the pool: loading, loaded, or being unloaded."""

    spec: ModelSpec
    model: Model | None = None
    engine: Engine | None = None
    pinned: bool = False  # the caller owns it: never unloaded by the pool
    leases: int = 0
    waiting: int = 0  # requests waiting for its load; each gets a lease when it ends
    draining: bool = False  # chosen to be unloaded: new requests wait for that, then load it again
    unloading: bool = False  # being closed: still in memory (listed by /api/ps) until the close ends
    keep_alive: float | None = DEFAULT_KEEP_ALIVE  # idle seconds before it is unloaded; None: never
    last_used: float = field(default_factory=time.monotonic)
    memory: int = 0  # bytes: the weights' file and the KV cache
    context_length: int = 0  # cells per slot
    ready: asyncio.Future | None = None  # done when loaded (or failed to)
    gone: asyncio.Future | None = None  # done when unloaded

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def measure(self) -> None:
        """Note the loaded model's memory and context size (listed while it is being unloaded too)."""
        assert self.model is not None
        self.memory = _measured_memory(self.model, self.engine)
        self.context_length = self.engine.n_ctx_per_slot if self.engine is not None else 0

    @property
    def busy(self) -> bool:
        engine = self.engine
        return bool(self.leases or self.waiting or (engine is not None and (engine.active_streams or engine.waiting)))

    @property
    def idle_seconds(self) -> float:
        return 0.0 if self.busy else time.monotonic() - self.last_used

    @property
    def expires_in(self) -> float | None:
        """Seconds until it is unloaded if nobody uses it (None: never)."""
        if self.unloading:
            return 0.0
        if self.pinned or self.keep_alive is None:
            return None
        return max(0.0, self.keep_alive - self.idle_seconds)


def _measured_memory(model: Model, engine: Engine | None) -> int:
    size = model.path.stat().st_size
    return size + (kv_cache_bytes(model, engine.n_ctx) if engine is not None else 0)


class ModelPool:
    """Which model answers a request, and when models load and unload (see the module's docstring).

    ``any_name``: one model answers every request whatever its ``model`` field says (a single-model
    server, as llama-server); otherwise an unknown name is a 404.
    """

    def __init__(self, specs: Sequence[ModelSpec], *, load: Callable[[ModelSpec], tuple[Model, Engine | None]],
                 keep_alive: float | None = DEFAULT_KEEP_ALIVE, max_loaded: int | None = None,
                 max_memory: int | None = None, any_name: bool = False) -> None:
        if max_loaded is not None and (isinstance(max_loaded, bool) or not isinstance(max_loaded, int)
                                       or max_loaded < 1):
            raise InvalidConfigError(f"--max-loaded must be a positive integer, not {max_loaded!r}.")
        if max_memory is not None and (not isinstance(max_memory, int) or max_memory < 1):
            raise InvalidConfigError(f"--max-memory must be a positive number of bytes, not {max_memory!r}.")
        if keep_alive is not None and not keep_alive >= 0:
            raise InvalidConfigError(f"--keep-alive must be 0 or more seconds (None: for ever), not {keep_alive!r}.")
        self.specs = list(specs)
        self.keep_alive = keep_alive
        self.max_loaded = max_loaded
        self.max_memory = max_memory
        self.any_name = any_name
        self._load = load
        self._served: dict[str, Served] = {}
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self.copies: dict[str, str] = {}  # name /api/copy gave -> the served model's name (kept while serving)
        self.retired_stats: collections.Counter[str] = collections.Counter()  # counters of unloaded engines
        self.loads = 0
        self.unloads = 0

    @classmethod
    def pinned(cls, model: Model, engine: Engine | None, name: str) -> ModelPool:
        """A pool of one model the caller loaded and will close, answering every request."""
        spec = ModelSpec(name or model.path.stem, str(model.path))

        def refuse(spec: ModelSpec) -> tuple[Model, Engine | None]:
            raise AssertionError("a pinned model is never loaded by the pool")

        pool = cls([spec], load=refuse, keep_alive=None, any_name=True)
        pool._served[spec.name] = served = Served(spec, model, engine, pinned=True, keep_alive=None)
        served.measure()
        return pool

    # --- which model ------------------------------------------------------------------------
    def find(self, name: str | None) -> ModelSpec:
        """The spec a request's ``model`` names (APIError 404 when none does)."""
        if self.any_name and len(self.specs) == 1:
            return self.specs[0]
        if not name:
            raise APIError(400, f"'model' is required: one of {self.names()}.", param="model")
        for candidate in dict.fromkeys((name, name.removesuffix(":latest"))):
            for spec in self.specs:
                if candidate == spec.name or candidate in spec.aliases:
                    return spec
        raise APIError(404, f"the model {name[:200]!r} is not served here; ask for one of {self.names()}.",
                       type="not_found_error", param="model", code="model_not_found")

    def names(self) -> str:
        return ", ".join([*(spec.name for spec in self.specs), *self.copies])

    def named_exactly(self, name: str) -> ModelSpec | None:
        """The spec whose name or alias ``name`` is (``:latest`` ignored), even on a one-model server,
        where ``find`` takes any name: what ``copy``, ``delete`` and ``GET /v1/models/{model}`` must not
        confuse."""
        for candidate in dict.fromkeys((name, name.removesuffix(":latest"))):
            for spec in self.specs:
                if candidate == spec.name or candidate in spec.aliases:
                    return spec
        return None

    def copy(self, source: str, destination: str) -> ModelSpec:
        """ollama's ``/api/copy`` on a running server: ``destination`` becomes one more name of the
        model ``source`` picks (an alias, which ``/v1/models`` shows, and an entry of ``/api/tags``),
        until the server stops or ``delete`` removes it. Nothing is written to disk. A destination
        that names another model is refused (400); one that names an earlier copy is moved."""
        spec = self.find(source)
        destination = destination.removesuffix(":latest")
        if len(destination) > 200 or not _COPY_NAME.fullmatch(destination):
            raise APIError(400, f"destination {destination[:200]!r} is not a model name: use letters, digits, "
                                "'_', '.', '-', a ':tag' and at most two '/'.", param="destination")
        owner = self.named_exactly(destination)
        if owner is not None and destination not in self.copies:
            if owner.name == spec.name:
                return spec  # already a name of that model: nothing to do
            raise APIError(400, f"{destination!r} is already the name of {owner.name}, which this server was "
                                "started with; choose another destination.", param="destination")
        if destination in self.copies:
            self._rename(self.copies.pop(destination), remove=destination)
        self.copies[destination] = spec.name
        return self._rename(spec.name, add=destination)

    def delete(self, name: str) -> None:
        """ollama's ``/api/delete`` on a running server: a name ``copy`` gave stops picking its model
        (the model itself stays served). The models the server was started with are not deleted
        (400: stop the server first, then ``mullama rm``); any other name is ollama's 404."""
        name = name.removesuffix(":latest")
        if name in self.copies:
            self._rename(self.copies.pop(name), remove=name)
            return
        spec = self.named_exactly(name)
        if spec is not None:
            raise APIError(400, f"{spec.name} is a model this server was started with, which it does not delete "
                                "while serving; only names given by /api/copy can be deleted. Stop the server, "
                                "then remove the file (mullama rm).", param="model")
        raise APIError(404, f"model '{name[:200]}' not found", type="not_found_error", param="model",
                       code="model_not_found")

    def _rename(self, name: str, *, add: str | None = None, remove: str | None = None) -> ModelSpec:
        """Replace the spec named ``name`` (and its Served's) by one with ``add`` among its aliases,
        or ``remove`` taken out."""
        index = next(i for i, spec in enumerate(self.specs) if spec.name == name)
        old = self.specs[index]
        aliases = tuple(alias for alias in old.aliases if alias != remove) + ((add,) if add else ())
        self.specs[index] = spec = dataclasses.replace(old, aliases=aliases)
        served = self._served.get(name)
        if served is not None:
            served.spec = spec
        return spec

    def loaded(self) -> list[Served]:
        """The models serving now."""
        return [served for served in self._served.values() if served.loaded]

    def in_memory(self) -> list[Served]:
        """The models serving now and those being closed (ollama's /api/ps lists a model until its
        memory is given back)."""
        return [served for served in self._served.values() if served.loaded or served.unloading]

    def served(self, spec: ModelSpec) -> Served | None:
        return self._served.get(spec.name)

    # --- leases -------------------------------------------------------------------------------
    async def lease(self, name: str | None, *, keep_alive: float | None = UNSET) -> Lease:
        """The model ``name`` picks, loaded, held until the lease is released. ``keep_alive`` (seconds,
        None for ever) replaces the model's own from then on, as ollama's per-request keep_alive does."""
        return Lease(self, await self.acquire(self.find(name)), keep_alive)

    async def acquire(self, spec: ModelSpec) -> Served:
        while True:
            served = self._served.get(spec.name)
            if served is not None and served.draining:  # being unloaded: wait, then load it afresh
                assert served.gone is not None
                await asyncio.shield(served.gone)
                continue
            if served is not None and served.loaded:
                self._loop = asyncio.get_running_loop()
                served.leases += 1
                served.last_used = time.monotonic()
                return served
            if served is not None:  # loading for another request: its loader grants us a lease
                return await self._wait_for_load(served)
            self._loop = asyncio.get_running_loop()
            if self._has_room(spec):
                served = Served(spec, keep_alive=self.keep_alive)
                loop = asyncio.get_running_loop()
                served.ready, served.gone = loop.create_future(), loop.create_future()
                served.ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved if unawaited
                self._served[spec.name] = served
                self._spawn(self._load_into(served))  # not cancelled with this request
                return await self._wait_for_load(served)
            self._make_room(spec)
            await self._wait_for_change()

    def release(self, served: Served, keep_alive: float | None = UNSET) -> None:
        """End a lease (in the event loop's thread)."""
        served.leases -= 1
        served.last_used = time.monotonic()
        if keep_alive is not UNSET and not served.pinned:
            served.keep_alive = keep_alive
        self._check(served)

    async def _wait_for_load(self, served: Served) -> Served:
        assert served.ready is not None
        served.waiting += 1
        try:
            await asyncio.shield(served.ready)
        except asyncio.CancelledError:
            if not served.ready.done():
                served.waiting -= 1
            elif not served.ready.cancelled() and served.ready.exception() is None:
                self.release(served)  # the loader granted a lease this request will not use
            raise
        return served

    async def _load_into(self, served: Served) -> None:
        assert served.ready is not None
        try:
            model, engine = await ADMIN.run(self._load, served.spec)
        except Exception as exc:  # noqa: BLE001 (every load failure goes to the requests waiting for it)
            self._served.pop(served.spec.name, None)
            served.waiting = 0
            served.ready.set_exception(exc if isinstance(exc, MullamaError) else
                                       ModelLoadError(f"loading {served.spec.name} failed: {exc!r}"))
            self._notify()
            return
        served.model, served.engine = model, engine
        served.measure()
        served.leases += served.waiting
        served.waiting = 0
        served.last_used = time.monotonic()
        self.loads += 1
        served.ready.set_result(None)
        self._fit_memory(keep=served)

    # --- room -----------------------------------------------------------------------------------
    def _estimate(self, spec: ModelSpec) -> int:
        path = spec.path()
        return path.stat().st_size if path is not None and path.is_file() else 0

    def _has_room(self, spec: ModelSpec) -> bool:
        if not self._served:
            return True  # the first model always loads (a budget below one model is refused at start)
        if self.max_loaded is not None and len(self._served) >= self.max_loaded:
            return False
        if self.max_memory is not None:
            used = sum(served.memory or self._estimate(served.spec) for served in self._served.values())
            return used + self._estimate(spec) <= self.max_memory
        return True

    def _make_room(self, spec: ModelSpec) -> None:
        """Choose the least recently used loaded model to unload (unless one is already going)."""
        if any(served.draining for served in self._served.values()):
            return
        candidates = [served for served in self._served.values()
                      if served.loaded and not served.pinned and served.spec != spec]
        if candidates:
            victim = min(candidates, key=lambda served: (served.busy, served.last_used))
            victim.draining = True
            self._check(victim)

    def _fit_memory(self, keep: Served) -> None:
        """After a load measured its real size: unload least recently used others until it fits."""
        if self.max_memory is None:
            return
        others = sorted((s for s in self._served.values() if s is not keep and s.loaded and not s.pinned
                         and not s.draining), key=lambda s: s.last_used)
        used = sum(served.memory for served in self._served.values() if not served.draining)
        for victim in others:
            if used <= self.max_memory:
                break
            victim.draining = True
            used -= victim.memory
            self._check(victim)

    def _check(self, served: Served) -> None:
        """Unload ``served`` now if it is due to go and nothing uses it."""
        if served.pinned or not served.loaded or served.busy:
            return
        if served.keep_alive is not None and served.idle_seconds >= served.keep_alive:
            served.draining = True
        if served.draining:
            self._spawn(self._unload(served, *self._take(served)))

    @staticmethod
    def _take(served: Served) -> tuple[Model | None, Engine | None]:
        """The model and engine of ``served``, which stops serving them: they are to be closed."""
        model, engine = served.model, served.engine
        served.model = served.engine = None
        served.unloading = True
        return model, engine

    async def _unload(self, served: Served, model: Model | None, engine: Engine | None) -> None:
        def close() -> None:
            if engine is not None:
                self.retired_stats.update(engine.stats)
                engine.close()
            if model is not None:
                model.close()

        try:
            await ADMIN.run(close)
        finally:
            self._served.pop(served.spec.name, None)
            self.unloads += 1
            assert served.gone is not None
            served.gone.set_result(None)
            self._notify()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task of its own, kept referenced until it ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def _wait_for_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), TICK)

    # --- the pool's own task ----------------------------------------------------------------------
    async def run(self) -> None:
        """Unload models as they become idle for long enough (the app runs this while it serves)."""
        while True:
            await asyncio.sleep(TICK)
            for served in list(self._served.values()):
                if served.loaded and served.busy:
                    served.last_used = time.monotonic()
                self._check(served)

    async def close(self) -> None:
        """Unload every model the pool loaded (letting their streams end first)."""
        for served in list(self._served.values()):
            if served.loaded and not served.pinned:
                assert served.engine is None or served.model is not None
                engine = served.engine
                if engine is not None:
                    await ADMIN.run(functools.partial(engine.stop, drain=True, timeout=30))
                served.draining = True
                await self._unload(served, *self._take(served))


class Lease:
    """A request's hold on a served model; ``release()`` ends it (once, from any thread). As an async
    context manager it holds the model for the block; ``until_closed`` holds it while a streamed body
    runs, and releases it when the body ends or is dropped unstarted."""

    def __init__(self, pool: ModelPool, served: Served, keep_alive: float | None) -> None:
        self.pool = pool
        self.served = served
        self.keep_alive = keep_alive
        self._released = False

    @property
    def name(self) -> str:
        return self.served.spec.name

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        loop = self.pool._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is not None and running is not loop:
            loop.call_soon_threadsafe(self.pool.release, self.served, self.keep_alive)
        else:
            self.pool.release(self.served, self.keep_alive)

    async def __aenter__(self) -> Served:
        return self.served

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def until_closed(self, body: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        async def held() -> AsyncGenerator[T, None]:
            try:
                async for item in body:
                    yield item
            finally:
                try:
                    await body.aclose()  # its own cleanup (cancelling its sequences) first
                finally:
                    self.release()

        wrapped = held()
        weakref.finalize(wrapped, self.release)
        return wrapped
