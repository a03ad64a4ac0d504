"""``mullama serve --rpc``: the serving process runs as a child, behind this one.

A lost RPC server leaves every model offloaded to it useless (the library raises RpcServerLostError
for them), and the serving process then ends (``cli._serve.end_when_rpc_is_lost``), to be started
afresh, reloading its models once the servers answer. So with ``--rpc`` this process holds the port
and proxies every request to a child ``mullama serve`` on a private loopback port. When the child
dies, the streams that were under way end with an error event in their API's own shape
(``generation_error``), requests meanwhile get a 503 to retry, ``/health`` reports ``degraded``, and
the child is started again as soon as the RPC servers answer: after a child that served, at once;
after one that failed to start, later and later (doubling up to ``MAX_RESTART_DELAY``); after
``restart_limit`` starts in a row that failed, the supervisor gives up and exits with an error (for
a process manager to act on) instead of retrying for ever. The shape of each answer is the wire
format the route declares (``_app.route_format``: the child serves the same route table), not a
guess from the path.

Request bodies stream through to the child as they come (the child's body limit answers a 413 after
reading only that much), and a client that goes away before its answer starts closes the request to
the child, which stops generating for it, as the plain server does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .._exceptions import InvalidConfigError
from ._app import route_format
from ._http import SSE, is_loopback
from ._request import APIError

__all__ = ["SUPERVISED_ENV", "supervise"]

SUPERVISED_ENV = "MULLAMA_SUPERVISED"  # set in the child: it serves, it does not supervise
FIRST_RESTART_DELAY = 0.5  # seconds before starting the child again; doubled after each failed start
MAX_RESTART_DELAY = 30.0
DEFAULT_RESTART_LIMIT = 10  # failed starts in a row before the supervisor gives up
HOP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade",
               "proxy-authorization", "proxy-connection"}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Child:
    """The child ``mullama serve``: started, watched, restarted."""

    def __init__(self, argv: Sequence[str], restart_limit: int = DEFAULT_RESTART_LIMIT) -> None:
        self.argv = list(argv)
        self.restart_limit = restart_limit
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.ready = False
        self.reason = "starting"  # why it is not ready
        self.restarts = 0
        self.failed_starts = 0  # starts in a row that ended before serving
        self.retry_at: float | None = None  # loop time of the next start, while waiting for it
        self.gave_up = False
        self.stopping = False
        self.first_start: asyncio.Future[str | None] | None = None  # the ready line, or None if it failed

    async def run(self) -> None:
        """Start the child, and again whenever it ends (see the module's docstring), until ``stop()``."""
        loop = asyncio.get_running_loop()
        self.first_start = loop.create_future()
        while not self.stopping:
            code, tail, served = await self._run_once()
            if self.stopping:
                return
            if not self.first_start.done():  # never served: the command itself failed (bad model, ...)
                self.first_start.set_result(None)
                self.reason = tail
                return
            self.failed_starts = 0 if served else self.failed_starts + 1
            ended = f"the serving process ended ({_describe(code)}): {tail}"
            if self.failed_starts >= self.restart_limit:
                self.gave_up = True
                self.reason = f"gave up after {self.failed_starts} failed starts in a row; {ended}"
                print(f"mullama: {self.reason}", file=sys.stderr, flush=True)
                return
            self.reason = ended
            delay = min(FIRST_RESTART_DELAY * 2 ** self.failed_starts, MAX_RESTART_DELAY)
            print(f"mullama: the serving process ended ({_describe(code)}); starting it again in {delay:g} s",
                  file=sys.stderr, flush=True)
            self.retry_at = loop.time() + delay
            await asyncio.sleep(delay)
            self.retry_at = None
            self.restarts += 1

    def health(self) -> dict[str, Any]:
        """What ``/health`` says while the child does not serve."""
        status = "failed" if self.gave_up else "degraded"
        answer: dict[str, Any] = {"status": status, "error": self.reason or "restarting", "restarts": self.restarts,
                                  "failed_starts": self.failed_starts, "restart_limit": self.restart_limit}
        if self.retry_at is not None:
            answer["retry_in"] = round(max(0.0, self.retry_at - asyncio.get_running_loop().time()), 1)
        return answer

    async def _run_once(self) -> tuple[int, str, bool]:
        """Run the child to its end: its exit code, its last line, and whether it served."""
        self.port = _free_port()
        command = [sys.executable, "-m", "mullama", *self.argv, "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, SUPERVISED_ENV: "1"})
        assert self.process.stdout is not None
        tail: list[str] = []
        served = False
        async for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("mullama serving") and not self.ready:
                self.ready, self.reason, served = True, "", True
                assert self.first_start is not None
                if not self.first_start.done():
                    self.first_start.set_result(line)
                continue
            print(line, file=sys.stderr, flush=True)  # its access log and messages, as our own
            tail = [*tail[-4:], line]
        code = await self.process.wait()
        self.ready = False
        return code, (tail[-1].strip() if tail else "") or "no message", served

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.stopping = True
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(sig)

    async def wait(self, timeout: float) -> None:
        if self.process is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.process.wait(), timeout)
            if self.process.returncode is None:
                self.process.kill()


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


# --- errors in each route's own format ------------------------------------------------------------
def _error_response(path: str, status: int, message: str, code: str) -> JSONResponse:
    headers = {"Retry-After": "2"} if status == 503 else None
    problem = APIError(status, message, type="server_error", code=code)
    return JSONResponse(route_format(path).error_body(problem), status_code=status, headers=headers)


def _error_event(path: str, message: str) -> bytes:
    """The last event of a stream whose serving process died: in the stream's own format (after a
    blank line for server-sent events, should the process have died in the middle of an event)."""
    fmt = route_format(path)
    event = fmt.error_event(APIError(500, message, type="server_error", code="generation_error"))
    return (("\n\n" if fmt.media_type == SSE else "") + event).encode()


# --- the proxy ---------------------------------------------------------------------------------------
async def _proxy(request: Request) -> Response:
    child: Child = request.app.state.child
    client: httpx.AsyncClient = request.app.state.client
    path = request.url.path
    if not child.ready:
        return _error_response(path, 503, f"the model is being restarted ({child.reason}); retry shortly.",
                               "worker_restarting")
    # the body streams through as it comes, with its length when the client gave one (the child's
    # limit then answers a 413 before reading it; the proxy never holds a whole body)
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
    if "content-length" in request.headers:
        headers.append(("content-length", request.headers["content-length"]))
    body_sent = asyncio.Event()

    async def request_body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            yield chunk
        body_sent.set()

    has_body = request.method not in ("GET", "HEAD") or "content-length" in request.headers
    outgoing = client.build_request(request.method, f"http://127.0.0.1:{child.port}{path}",
                                    params=request.query_params, headers=headers,
                                    content=request_body() if has_body else None)
    if not has_body:
        body_sent.set()
    sending = asyncio.ensure_future(client.send(outgoing, stream=True))
    watcher = asyncio.ensure_future(_cancel_on_disconnect(request, body_sent, sending))
    try:
        answer = await sending
    except httpx.ConnectError:
        return _error_response(path, 503, "the model is being restarted; retry shortly.", "worker_restarting")
    except httpx.TransportError:
        return _error_response(path, 500, "generation failed: the serving process ended (an RPC server was "
                                          "lost); retry shortly.", "generation_error")
    except ClientDisconnect:  # the client left while sending its body
        return Response(status_code=499)
    except asyncio.CancelledError:
        if not watcher.done():  # this task itself was cancelled (a shutdown)
            raise
        return Response(status_code=499)  # the client left: nobody reads this answer
    finally:
        watcher.cancel()

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in answer.aiter_raw():
                yield chunk
        except httpx.TransportError:
            yield _error_event(path, "generation failed: the serving process ended (an RPC server was lost).")
        finally:
            await answer.aclose()

    response_headers = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
    return StreamingResponse(body(), status_code=answer.status_code, headers=response_headers)


async def _cancel_on_disconnect(request: Request, body_sent: asyncio.Event, sending: asyncio.Future) -> None:
    """Close the request to the child (``sending``: until its answer starts) when the client goes
    away: the child sees its client leave and stops generating for it. (A streamed answer's body is
    closed the same way by StreamingResponse.)"""
    await body_sent.wait()
    while (await request.receive())["type"] != "http.disconnect":
        pass
    sending.cancel()


async def _health(request: Request) -> Response:
    child: Child = request.app.state.child
    if child.ready:
        with contextlib.suppress(httpx.TransportError):
            answer = await request.app.state.client.get(f"http://127.0.0.1:{child.port}{request.url.path}")
            return JSONResponse({**answer.json(), "restarts": child.restarts}, status_code=answer.status_code)
    return JSONResponse(child.health(), status_code=503)


async def _live(request: Request) -> Response:
    return JSONResponse({"status": "live"})


async def _no_websocket(ws: WebSocket) -> None:
    await ws.accept()  # (so that the client reads the reason; a refused handshake is a bare 403)
    await ws.close(code=1013, reason="the WebSocket is not served with --rpc; stream over HTTP instead")


def supervise(argv: Sequence[str], *, host: str, port: int, api_key: str | None, drain_timeout: float,
              restart_limit: int = DEFAULT_RESTART_LIMIT) -> int:
    """Serve ``argv`` (a ``mullama serve`` command line) from a child process behind ``host:port``;
    exit 1 if the child cannot be started again ``restart_limit`` times in a row."""
    import uvicorn

    from ._run import check_port_free

    if not is_loopback(host) and not api_key:
        raise InvalidConfigError(f"refusing to listen on {host} without an API key: anyone on the network could "
                                 "use it. Pass --api-key (or set MULLAMA_API_KEY), or bind 127.0.0.1.")
    if isinstance(restart_limit, bool) or not isinstance(restart_limit, int) or restart_limit < 1:
        raise InvalidConfigError(f"--restart-limit must be a positive integer, not {restart_limit!r}.")
    check_port_free(host, port)
    child = Child(argv, restart_limit)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0),
                                             limits=httpx.Limits(max_keepalive_connections=32))
        watcher = asyncio.create_task(child.run())
        watcher.add_done_callback(lambda _: give_up() if child.gave_up else None)
        try:
            yield
        finally:
            child.stop()
            await child.wait(drain_timeout + 5)
            watcher.cancel()
            await app.state.client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    app = Starlette(routes=[Route("/health", _health), Route("/health/ready", _health), Route("/health/live", _live),
                            WebSocketRoute("/v1/ws", _no_websocket),
                            Route("/{path:path}", _proxy, methods=methods)], lifespan=lifespan)
    app.state.child = child

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            while child.first_start is None:
                await asyncio.sleep(0.01)
            line = await child.first_start
            if line is None:  # the command failed before serving (its own error line was printed): stop

                self.should_exit = True
                self.failed = True
                return
            shown = f"[{host}]" if ":" in host else host
            print(f"{line.split(' on http')[0]}, supervised (restarted if an RPC server is lost) on "
                  f"http://{shown}:{port}/v1", flush=True)

        def handle_exit(self, sig: int, frame: Any) -> None:
            child.stop(sig)  # the child drains its streams; this process waits for them
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=int(drain_timeout) + 5))
    server.failed = False  # type: ignore[attr-defined]

    def give_up() -> None:  # the child could not be started again: exit 1
        server.failed = True  # type: ignore[attr-defined]
        server.should_exit = True

    server.run()
    return 1 if server.failed else 0  # type: ignore[attr-defined]
