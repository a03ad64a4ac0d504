"""A relay between ggml's RPC backend and each ``ggml-rpc-server``, so that losing a server cannot
end the process.

ggml sends every RPC through a thread of its own and aborts the process (``GGML_ABORT``) the moment
a send or a receive fails: nothing can be caught. So ggml never talks to a server directly: for each
server address the library listens on 127.0.0.1 (an ephemeral port) and gives ggml *that* address.
Each connection ggml opens there is relayed, message by message, to the real server by a daemon
thread. When the server fails (refused, reset, closed, an answer of the wrong size) the relay marks
the address lost and from then on answers every command itself with well-formed replies (zeros of
the right size, a fake buffer for an allocation), finishing the message under way first. ggml then
never aborts: its computation "succeeds" with garbage, which the library refuses after each decode
(:func:`check`, raising RpcServerLostError), and freeing the model stays safe.

The wire format (ggml-rpc.cpp of the pinned llama.cpp, protocol 7): a request is one byte of command,
a little-endian uint64 size and that many bytes; commands sent with an output get an answer of a
uint64 size and that many bytes, whose size the client knows in advance (``ANSWER_SIZES``; for
GET_TENSOR, the ``size`` field at the end of the request). The hello's connection capabilities are
zeroed both ways, so that neither side upgrades the transport past the relay.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .._exceptions import RpcServerLostError

__all__ = ["Relay", "Relays", "on_lost", "real_address"]

# ggml-rpc.cpp's commands (enum rpc_cmd)
(ALLOC_BUFFER, GET_ALIGNMENT, GET_MAX_SIZE, BUFFER_GET_BASE, FREE_BUFFER, BUFFER_CLEAR, SET_TENSOR, SET_TENSOR_HASH,
 GET_TENSOR, COPY_TENSOR, GRAPH_COMPUTE, GET_DEVICE_MEMORY, INIT_TENSOR, GET_ALLOC_SIZE, HELLO, DEVICE_COUNT,
 GRAPH_RECOMPUTE, MEMSET_TENSOR) = range(18)
CONN_CAPS_SIZE = 24  # RPC_CONN_CAPS_SIZE
PROTO_MAJOR = 7  # RPC_PROTO_MAJOR_VERSION of ggml-rpc.h
# The size of each command's answer (rpc_msg_*_rsp, packed); commands not here have none.
ANSWER_SIZES = {HELLO: 4 + CONN_CAPS_SIZE, DEVICE_COUNT: 4, ALLOC_BUFFER: 16, GET_ALIGNMENT: 8, GET_MAX_SIZE: 8,
                BUFFER_GET_BASE: 8, SET_TENSOR_HASH: 1, GET_TENSOR: -1, COPY_TENSOR: 1, GET_DEVICE_MEMORY: 16,
                GET_ALLOC_SIZE: 8}  # -1: rpc_msg_get_tensor_req's last field (rpc_tensor, offset, size)
SMALL = 1 << 16  # requests up to this size are read whole; larger ones (SET_TENSOR, GRAPH_COMPUTE) stream
CHUNK = 1 << 20
FAKE_POINTER = 1 << 40  # a remote buffer (and its base) of a lost server: non-zero, aligned
CONNECT_TIMEOUT = 5.0

_hooks: list[Callable[[str], None]] = []  # called with the address when a server is lost (on_lost)
_endpoints: dict[str, Relay] = {}  # the relay's own address (what ggml knows) -> the relay


class _Lost(Exception):
    """The real server failed (the message says how)."""


class Relay:
    """The local stand-in for the RPC server at ``address``: ggml connects to ``endpoint``."""

    def __init__(self, address: str, host: str, port: int) -> None:
        self.address = address
        self._target = (host, port)
        self.lost: str | None = None  # why the server was lost, once it was
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        _endpoints[self.endpoint] = self
        # ggml keeps the endpoint for the life of the process (its devices, its dispatchers): so does the relay
        threading.Thread(target=self._accept, name=f"mullama-rpc-relay {address}", daemon=True).start()

    def error(self) -> RpcServerLostError:
        """The error for a model that has layers on this (lost) server."""
        return RpcServerLostError(
            f"the RPC server at {self.address} was lost ({self.lost}); the models using it cannot compute any "
            f"more: restart ggml-rpc-server at {self.address}, then load the model again (and close this one).")

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self.lost is not None:
                return
            self.lost = reason
        for hook in list(_hooks):
            hook(self.address)

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            threading.Thread(target=self._relay, args=(client,), name=f"mullama-rpc-relay {self.address}",
                             daemon=True).start()

    def _connect(self) -> socket.socket | None:
        if self.lost is not None:
            return None
        try:
            upstream = socket.create_connection(self._target, timeout=CONNECT_TIMEOUT)
        except OSError as exc:
            self._lose(_reason(exc))
            return None
        upstream.settimeout(None)
        _tune(upstream)
        return upstream

    def _relay(self, client: socket.socket) -> None:
        """Relay one connection of ggml's, command by command, until ggml closes it."""
        _tune(client)
        upstream = self._connect()
        reader, answers = _Reader(client), _Reader(upstream, server=True) if upstream is not None else None
        try:
            while True:
                header = reader.exact(9)
                command, size = struct.unpack("<BQ", header)
                request = b""
                if size <= SMALL:
                    request = reader.exact(size)
                    if command == HELLO:  # no transport upgrade past the relay
                        request = bytes(len(request))
                    upstream = self._send(upstream, header + request)
                else:
                    upstream = self._send(upstream, header)
                    for piece in reader.pieces(size):
                        upstream = self._send(upstream, piece)
                answer = ANSWER_SIZES.get(command)
                if answer is not None:
                    if answer < 0:
                        answer = struct.unpack_from("<Q", request, len(request) - 8)[0] if len(request) >= 8 else 0
                    upstream = self._answer(client, upstream, answers, command, request, answer)
        except OSError:  # ggml closed its connection (its model freed, the process ending)
            pass
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    def _send(self, upstream: socket.socket | None, data: bytes | memoryview) -> socket.socket | None:
        """Send ``data`` on; once the server failed, drop it (the rest of the request is still read)."""
        if upstream is None:
            return None
        try:
            upstream.sendall(data)
            return upstream
        except OSError as exc:
            self._drop(upstream, _reason(exc))
            return None

    def _drop(self, upstream: socket.socket, reason: str) -> None:
        self._lose(reason)
        upstream.close()

    def _answer(self, client: socket.socket, upstream: socket.socket | None, answers: _Reader | None,
                command: int, request: bytes, size: int) -> socket.socket | None:
        """Pass the server's answer (``size`` bytes) to ggml, or make it up once the server is lost
        (the rest of an answer cut short: zeros)."""
        sent = -1  # bytes of the answer's payload passed on; -1: not even its size yet
        try:
            if upstream is None or answers is None:
                raise _Lost
            (announced,) = struct.unpack("<Q", answers.exact(8))
            if announced != size:
                raise _Lost(f"it answered {announced} bytes where {size} were due")
            if size <= SMALL:  # whole, in one send
                answer = answers.exact(size)
                if command == HELLO:  # no transport upgrade past the relay
                    answer = answer[:4] + bytes(CONN_CAPS_SIZE)
                client.sendall(struct.pack("<Q", size) + answer)
                return upstream
            client.sendall(struct.pack("<Q", size))
            sent = 0
            for piece in answers.pieces(size):
                client.sendall(piece)
                sent += len(piece)
            return upstream
        except _Lost as exc:
            if upstream is not None:
                self._drop(upstream, str(exc) or "it closed the connection")
                upstream = None
            if sent < 0:
                client.sendall(struct.pack("<Q", size) + _made_up(command, request, size))
            else:
                for start in range(sent, size, CHUNK):
                    client.sendall(bytes(min(CHUNK, size - start)))
            return upstream


class Relays(tuple[Relay, ...]):
    """A model's relays, one per RPC server (empty, and false, without RPC): looked at after each
    decode, since a lost server makes ggml compute garbage instead of ending the process."""

    def error(self, lib: Any = None, ctx: Any = None) -> RpcServerLostError | None:
        """The error to raise if a server of these was lost, else None. After a decode on the llama
        context ``ctx``, its computation is waited for first: llama.cpp decodes asynchronously, so the
        answers a lost server leaves to the relay may come after ``llama_decode`` returned."""
        if not self:
            return None
        if ctx is not None:
            lib.llama_synchronize(ctx)
        return next((relay.error() for relay in self if relay.lost is not None), None)

    def check(self, lib: Any = None, ctx: Any = None) -> None:
        """Raise RpcServerLostError if a server of these was lost (see :meth:`error`)."""
        error = self.error(lib, ctx)
        if error is not None:
            raise error


def _made_up(command: int, request: bytes, size: int) -> bytes:
    """The answer of a lost server: well-formed, and enough for ggml to go on without aborting."""
    if command == HELLO:
        return bytes([PROTO_MAJOR, 0, 0, 0]) + bytes(CONN_CAPS_SIZE)
    if command == DEVICE_COUNT:
        return struct.pack("<I", 1)
    if command == ALLOC_BUFFER:  # rpc_msg_alloc_buffer_req: device (uint32), size (uint64)
        requested = struct.unpack_from("<Q", request, 4)[0] if len(request) >= 12 else 0
        return struct.pack("<QQ", FAKE_POINTER, requested)
    if command == GET_ALIGNMENT:
        return struct.pack("<Q", 32)
    if command == GET_MAX_SIZE:
        return struct.pack("<Q", (1 << 64) - 1)
    if command == BUFFER_GET_BASE:
        return struct.pack("<Q", FAKE_POINTER)
    if command == SET_TENSOR_HASH:  # "the server has the data": the tensor is not sent
        return b"\x01"
    return bytes(size)


class _Reader:
    """Buffered reads from a socket: few system calls for many small messages. Reading from the
    server (``server=True``), a failure is the server's loss (_Lost)."""

    def __init__(self, sock: socket.socket, *, server: bool = False) -> None:
        self._sock = sock
        self._server = server
        self._buffer = bytearray(CHUNK)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buffer):
            self._compact()
        try:
            received = self._sock.recv_into(self._view[self._end:])
        except OSError as exc:
            if self._server:
                raise _Lost(_reason(exc)) from None
            raise
        if not received:
            if self._server:
                raise _Lost("it closed the connection")
            raise ConnectionResetError("the connection was closed")
        self._end += received

    def _compact(self) -> None:
        """Move the bytes not read yet to the front of the buffer."""
        left = bytes(self._view[self._start:self._end])
        self._view[:len(left)] = left
        self._start, self._end = 0, len(left)

    def exact(self, size: int) -> bytes:
        """The next ``size`` bytes (at most SMALL)."""
        while self._end - self._start < size:
            if len(self._buffer) - self._start < size:
                self._compact()
            self._fill()
        data = bytes(self._view[self._start:self._start + size])
        self._start += size
        return data

    def pieces(self, size: int) -> Iterator[memoryview]:
        """The next ``size`` bytes in pieces (each valid until the next is taken)."""
        while size:
            if self._start == self._end:
                self._fill()
            take = min(size, self._end - self._start)
            yield self._view[self._start:self._start + take]
            self._start += take
            size -= take


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _tune(sock: socket.socket) -> None:
    """No delay for small messages; keepalive probes find a peer that vanished without closing."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def on_lost(hook: Callable[[str], None]) -> None:
    """Call ``hook(address)`` (in a relay's thread) when an RPC server is lost."""
    _hooks.append(hook)


def real_address(endpoint: str) -> str:
    """The server address behind a relay's ``endpoint`` (what ggml names a device by), marked when lost."""
    relay = _endpoints.get(endpoint)
    if relay is None:
        return endpoint
    return relay.address + (" (lost)" if relay.lost is not None else "")
