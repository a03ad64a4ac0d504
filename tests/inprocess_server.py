"""The real server app on uvicorn, on 127.0.0.1, in a thread of the test process (no mock: real
HTTP, real engine, real model), for tests that need to look inside the server while it serves."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from upstream import free_port

from mullama.generate._engine import Engine
from mullama.server import ServerSettings, create_app


def wait_for(condition, timeout: float = 120.0) -> None:
    """Until ``condition()`` is true (the bound only ends a hung test)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


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


@contextmanager
def serving(model, *, settings: ServerSettings | None = None, **engine_options) -> Iterator[tuple]:
    """``model``'s app on an engine of its own, served on 127.0.0.1: yields (server, engine)."""
    engine = Engine(model, **engine_options)
    server = InProcessServer(create_app(model, engine, settings or ServerSettings(model_name="smollm2:135m")))
    try:
        yield server, engine
    finally:
        server.close()
        engine.close()
