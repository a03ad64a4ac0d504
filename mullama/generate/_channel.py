"""A bounded hand-over from the engine's thread to one stream's consumer (an asyncio task).

The producer ``offer``s items only when there is room: when the consumer is slow its
buffer fills and the producer leaves that stream paused, so memory stays bounded. An
asyncio consumer awaits ``get_async()`` without blocking its event loop.

No lock is taken per item: a ``deque``'s ``append`` and ``popleft`` are atomic, and each
side wakes the other only when the other said it is waiting. The consumer publishes its
waiter, then looks at the buffer again; the producer appends, then looks for a waiter. The
producer, finding the buffer full, marks itself ``paused``, then looks at the buffer again; the
consumer takes an item, then looks at ``paused``. Whichever order the two threads run in, one
of them sees the other's step, so no item and no room is ever missed, and nobody is woken
for nothing on every token.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import Any

from .._exceptions import detached

__all__ = ["Channel"]


class Channel:
    def __init__(self, maxsize: int) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._maxsize = maxsize
        self.closed = threading.Event()  # set by the consumer: the producer should stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[Any] | None = None
        self._paused = False  # the producer found no room and waits for the consumer to take one
        self.on_take: Callable[[], None] | None = None  # called when a take makes room for a paused producer
        self.max_queued = 0
        self._final: Any = None  # the last item, delivered after everything queued; never blocks

    # --- producer side ----------------------------------------------------------
    def offer(self, item: Any) -> bool:
        """Queue ``item`` if there is room now; never waits."""
        items = self._items
        if len(items) >= self._maxsize:
            return False
        items.append(item)
        if len(items) > self.max_queued:
            self.max_queued = len(items)
        if self._waiter is not None:
            self._wake_consumer()
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
        """Whether an item can be offered now. When not, the next take calls ``on_take``."""
        if len(self._items) < self._maxsize:
            return True
        self._paused = True
        return len(self._items) < self._maxsize  # a take between the two looks did not see the flag

    def free(self) -> int:
        """How many items can be offered now (a take meanwhile only makes more room)."""
        return self._maxsize - len(self._items)

    def _wake_consumer(self) -> None:
        waiter, loop = self._waiter, self._loop
        if waiter is not None and loop is not None:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # the consumer's event loop is closed: nobody is waiting anymore
                pass

    # --- consumer side ----------------------------------------------------------
    def qsize(self) -> int:
        return len(self._items)

    def _take_now(self) -> Any:
        """A queued item, else the final item once everything before it was taken, else _NOTHING."""
        items = self._items
        if not items:
            final = self._final
            if final is None:
                return _NOTHING
            if not items:  # the final item is set after the last append: look once more
                return final
        item = items.popleft()
        if self._paused:
            self._paused = False
            if self.on_take is not None:
                self.on_take()
        return item

    async def get_async(self) -> Any:
        """The next item, awaited without blocking the event loop: None after ``finish()``; raises
        the error given to ``fail()``."""
        loop = self._loop = asyncio.get_running_loop()
        while True:
            item = self._take_now()
            if item is not _NOTHING:
                return _unpack(item)
            waiter = loop.create_future()
            self._waiter = waiter
            try:
                # Look again once the waiter is published: an append in between would be missed.
                if self._items or self._final is not None:
                    continue
                await waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        """The consumer has gone: stop the producer and drop what is queued."""
        self.closed.set()
        self._items.clear()


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


def _wake(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_result(None)
