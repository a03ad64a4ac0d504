"""Run one function in several threads at once and collect what they raised."""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_in_threads(work: Callable[[int], object], count: int, *, timeout: float = 300.0) -> list[BaseException]:
    """Call ``work(0)`` … ``work(count - 1)``, each in its own thread, all at once; wait for them.

    Returns the exceptions the calls raised (and a TimeoutError for each thread still running
    after ``timeout`` seconds): an empty list means every call finished cleanly.
    """
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 (reported to the test, which asserts on the list)
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        if thread.is_alive():
            errors.append(TimeoutError(f"{thread.name} still running after {timeout} s"))
    return errors
