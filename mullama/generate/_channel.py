"""A bounded hand-over from the engine's thread to one stream's consumer (an asyncio task).

The producer ``offer``s items to a ``queue.Queue(maxsize)`` and only when it has room: when
the consumer is slow the queue fills and the producer leaves that stream paused, so
memory stays bounded. An asyncio consumer awaits ``get_async()`` without blocking its event
loop: the producer wakes it with ``call_soon_threadsafe`` only when it is waiting.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

from .._exceptions import detached

__all__ = ["Channel"]


class Channel:
    def __init__(self, maxsize: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.closed = threading.Event()  # set by the consumer: the producer should stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future | None = None
        self.on_take: Callable[[], None] | None = None  # called after the consumer takes an item
        self.max_queued = 0
        self._final: Any = None  # the last item, delivered after everything queued; never blocks

    # --- producer side ----------------------------------------------------------
    def offer(self, item: Any) -> bool:
        """Queue ``item`` if there is room now; never waits."""
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            return False
        self._delivered()
        return True

    def finish(self) -> None:
        """The producer is done: after the queued items, the consumer gets None. Never waits."""
        self._deliver_final(_END)

    def fail(self, error: BaseException) -> None:
        """The producer failed: after the queued items, the consumer's get raises ``error``."""
        self._deliver_final(_Failure(error))

    def _deliver_final(self, item: Any) -> None:
        self._final = item
        self._wake_consumer()

    def has_room(self) -> bool:
        return not self._queue.full()

    def _delivered(self) -> None:
        size = self._queue.qsize()
        self.max_queued = max(self.max_queued, size)
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        waiter, loop = self._waiter, self._loop
        if waiter is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the consumer's event loop is closed: nobody is waiting anymore
                pass

    # --- consumer side ----------------------------------------------------------
    def qsize(self) -> int:
        return self._queue.qsize()

    def _take_now(self) -> Any:
        """A queued item, else the final item once everything before it was taken, else _NOTHING."""
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            if self._final is None:
                return _NOTHING
            try:  # the final item is set after the last put: look once more before returning it
                item = self._queue.get_nowait()
            except queue.Empty:
                return self._final
        self._taken()
        return item

    async def get_async(self) -> Any:
        """Like ``get``, awaited without blocking the event loop."""
        q = self._queue
        self._loop = asyncio.get_running_loop()
        while True:
            item = self._take_now()
            if item is not _NOTHING:
                return _unpack(item)
            waiter = self._loop.create_future()
            self._waiter = waiter
            try:
                # Check again once the waiter is published: a put in between would be missed.
                if not q.empty() or self._final is not None:
                    continue
                await waiter
            finally:
                self._waiter = None

    def _taken(self) -> None:
        if self.on_take is not None:
            self.on_take()

    def close(self) -> None:
        """The consumer has gone: stop the producer and drop what is queued."""
        self.closed.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break


_NOTHING = object()
_END = object()


class _Failure:
    """An exception travelling from the producer to the consumer."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _unpack(item: Any) -> Any:
    if item is _END:
        return None
    if isinstance(item, _Failure):
        # A copy: the stored error, raised itself, would gather the consumer's frames (a stream, the
        # AsyncModel a caller's frame holds) into a cycle with the channel that keeps it.
        raise detached(item.error)
    return item


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
