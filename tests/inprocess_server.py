"""The real server app on uvicorn, on 127.0.0.1, in a thread of the test process (no mock: real
HTTP, real engine, real model), for tests that need to look inside the server while it serves."""

from __future__ import annotations

import threading
import time

import uvicorn
from upstream import free_port


def wait_for(condition, timeout: float = 10.0) -> float:
    """Seconds until ``condition()`` is true; fails the test after ``timeout``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not reached"
        time.sleep(0.005)
    return time.monotonic() - started


class InProcessServer:
    """The real app on uvicorn, on 127.0.0.1, in a thread of this process."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
