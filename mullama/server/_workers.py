"""The server's worker threads: blocking work runs on a bounded pool of its own kind, never on
Python's default executor (``asyncio.to_thread``), which every kind shared. Eight embedding requests
filled that one (its size is the core count plus four), and a chat request's templating, a listing or
a model load then waited behind them for minutes.

Kinds: ``EMBEDDINGS`` (embedding and rerank decodes, and their answers' JSON), ``GENERATION`` (a
chat or completion request's templating and tokenising, and its answer's JSON), ``ADMIN`` (listings,
``/api/show``, token counts, model loads and unloads, slot files), ``DOWNLOADS`` (``/api/pull``,
which may take minutes). Each pool makes its threads when
work first comes. Concurrent embedding requests still share decodes (mullama.generate._embed): the
thread that decodes takes the texts of every request waiting, so a small pool loses nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["ADMIN", "DOWNLOADS", "EMBEDDINGS", "GENERATION", "Workers"]

T = TypeVar("T")


class Workers:
    """At most ``size`` threads for one kind of blocking work (see the module's docstring)."""

    def __init__(self, kind: str, size: int) -> None:
        self.kind = kind
        self.size = size
        self._executor = ThreadPoolExecutor(size, thread_name_prefix=f"mullama-{kind}")

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on one of these threads (with the caller's context variables, as
        ``asyncio.to_thread``). Cancelling the awaiting task drops work not started yet; work
        already running goes on unless it watches for that itself (as embeddings do)."""
        call = functools.partial(contextvars.copy_context().run, work, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)


EMBEDDINGS = Workers("embeddings", 4)
GENERATION = Workers("generation", 4)
ADMIN = Workers("admin", 4)
DOWNLOADS = Workers("downloads", 2)
