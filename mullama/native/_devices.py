"""Where a model's layers run: ggml's devices (the CPU, GPUs of the backends the library was built
with) and upstream's RPC servers on other machines (``ggml-rpc-server``), and the device options
of ``Model.load`` (``n_gpu_layers``, ``main_gpu``, ``split_mode``, ``tensor_split``, ``rpc_servers``).

RPC servers are reached through ggml's backend registry, as llama-server's ``--rpc`` does: the RPC
backend's ``ggml_backend_rpc_add_server`` (found with ``ggml_backend_reg_get_proc_address``) makes a
registry of the server's devices, which is registered once per address. ggml aborts the process
when it cannot reach a server, so each address is first checked here, in Python: a TCP connection
and the RPC protocol's hello (``MODEL_LOAD_ERROR`` naming the address when either fails). ggml is
then given not the server's address but its relay's (mullama.native._rpc_relay): a server lost
later is an RpcServerLostError, not the end of the process. A lost address gets a new relay (and a
new registration) when a model is loaded with it again.
"""

from __future__ import annotations

import math
import socket
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._exceptions import InvalidConfigError, ModelLoadError
from ._rpc_relay import CONN_CAPS_SIZE as RPC_CONN_CAPS_SIZE
from ._rpc_relay import HELLO as RPC_HELLO
from ._rpc_relay import PROTO_MAJOR as RPC_PROTO_MAJOR
from ._rpc_relay import Relay, Relays, real_address

__all__ = ["Device", "DeviceOptions", "check_rpc_server", "list_devices"]

SPLIT_MODES = {"none": "LLAMA_SPLIT_MODE_NONE", "layer": "LLAMA_SPLIT_MODE_LAYER", "row": "LLAMA_SPLIT_MODE_ROW"}
DEVICE_TYPES = {"GGML_BACKEND_DEVICE_TYPE_CPU": "cpu", "GGML_BACKEND_DEVICE_TYPE_GPU": "gpu",
                "GGML_BACKEND_DEVICE_TYPE_IGPU": "igpu", "GGML_BACKEND_DEVICE_TYPE_ACCEL": "accel",
                "GGML_BACKEND_DEVICE_TYPE_META": "meta"}
CONNECT_TIMEOUT = 5.0

_registered: dict[str, tuple[Relay, list[Any]]] = {}  # RPC address -> its relay and devices (again once lost)
_register_lock = threading.Lock()
_abort_callback: list[Any] = []  # the C callback of one_line_aborts, alive for the process


@dataclass(frozen=True)
class Device:
    """A ggml device: ``name`` (``CPU``, ``CUDA0``, ``RPC0``...), what it is, its memory in bytes."""

    name: str
    description: str
    type: str  # cpu, gpu, igpu, accel
    backend: str  # the backend registry's name (CPU, CUDA, Vulkan, RPC[host:port], ...)
    memory_free: int
    memory_total: int


def list_devices(library: Any) -> list[Device]:
    """Every device ggml knows in this process (RPC servers once a model has used them)."""
    ffi, lib = library.ffi, library.lib
    types = {int(getattr(lib, name)): short for name, short in DEVICE_TYPES.items() if hasattr(lib, name)}
    devices = []
    for index in range(lib.ggml_backend_dev_count()):
        device = lib.ggml_backend_dev_get(index)
        free, total = ffi.new("size_t *"), ffi.new("size_t *")
        lib.ggml_backend_dev_memory(device, free, total)
        registry = lib.ggml_backend_dev_backend_reg(device)
        description = ffi.string(lib.ggml_backend_dev_description(device)).decode("utf-8", "replace")
        backend = ffi.string(lib.ggml_backend_reg_name(registry)).decode("utf-8", "replace")
        if backend.startswith("RPC"):  # ggml knows the relay's address: show the server's
            description = real_address(description)
            backend = f"RPC[{description}]"
        devices.append(Device(ffi.string(lib.ggml_backend_dev_name(device)).decode("utf-8", "replace"),
                              description, types.get(int(lib.ggml_backend_dev_type(device)), "other"), backend,
                              int(free[0]), int(total[0])))
    return devices


def _parse_address(address: Any) -> tuple[str, int]:
    if not isinstance(address, str) or address.count(":") < 1:
        raise InvalidConfigError(f"an RPC server is HOST:PORT (e.g. 192.168.1.20:50052), not {address!r}.")
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidConfigError(f"an RPC server is HOST:PORT with a port from 1 to 65535, not {address!r}.")
    return host, int(port)


def check_rpc_server(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Connect to the RPC server at ``address`` and exchange the protocol's hello (then hang up),
    so that an unreachable, wrong or incompatible server is a ModelLoadError here, not an abort in ggml."""
    host, port = _parse_address(address)
    hint = f"start `ggml-rpc-server -H {host} -p {port}` there (python build_llama.py --rpc builds it)"
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.sendall(struct.pack("<BQ", RPC_HELLO, RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
            answer = _receive(connection, 8 + 4 + RPC_CONN_CAPS_SIZE)
    except OSError as exc:
        raise ModelLoadError(f"cannot reach the RPC server at {address} ({exc.strerror or exc}); {hint}.") from None
    (size,) = struct.unpack("<Q", answer[:8])
    major, minor, patch = answer[8], answer[9], answer[10]
    if size != 4 + RPC_CONN_CAPS_SIZE:
        raise ModelLoadError(f"{address} does not answer as a ggml RPC server does; {hint}.")
    if major != RPC_PROTO_MAJOR:
        raise ModelLoadError(f"the RPC server at {address} speaks protocol {major}.{minor}.{patch}; this llama.cpp "
                             f"needs {RPC_PROTO_MAJOR}.x: run a ggml-rpc-server built from the same llama.cpp.")


def _receive(connection: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        part = connection.recv(size - len(data))
        if not part:
            raise ConnectionResetError("the server closed the connection")
        data += part
    return data


def rpc_devices(library: Any, address: str) -> list[Any]:
    """The devices of the RPC server at ``address``, registered with ggml (through a relay) the first
    time, and again after the server was lost."""
    with _register_lock:
        if address in _registered and _registered[address][0].lost is None:
            return _registered[address][1]
        host, port = _parse_address(address)
        check_rpc_server(address)
        ffi, lib = library.ffi, library.lib
        registry = lib.ggml_backend_reg_by_name(b"RPC")
        if registry == ffi.NULL:
            raise ModelLoadError("this llama.cpp build has no RPC backend: rebuild it with `python build_llama.py` "
                                 "(mullama's builds include it).")
        address_proc = lib.ggml_backend_reg_get_proc_address(registry, b"ggml_backend_rpc_add_server")
        if address_proc == ffi.NULL:
            raise ModelLoadError("this llama.cpp build's RPC backend has no ggml_backend_rpc_add_server.")
        add_server = ffi.cast("ggml_backend_reg_t (*)(const char *)", address_proc)
        relay = Relay(address, host, port)
        server = add_server(relay.endpoint.encode())
        if relay.lost is not None:
            raise relay.error()
        if server == ffi.NULL:
            raise ModelLoadError(f"the RPC server at {address} has no device.")
        lib.ggml_backend_register(server)
        devices = [lib.ggml_backend_reg_dev_get(server, i) for i in range(lib.ggml_backend_reg_dev_count(server))]
        _registered[address] = (relay, devices)
        return devices


@dataclass(frozen=True)
class DeviceOptions:
    """Where ``Model.load`` puts a model's layers, checked before anything is loaded."""

    n_gpu_layers: int = 0
    main_gpu: int = 0
    split_mode: str = "layer"
    tensor_split: tuple[float, ...] = ()
    rpc_servers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        n = self.n_gpu_layers
        if isinstance(n, bool) or not isinstance(n, int) or not -1 <= n < 2**31:
            raise InvalidConfigError(f"n_gpu_layers must be an integer (-1 for all layers), not {n!r}.")
        if isinstance(self.main_gpu, bool) or not isinstance(self.main_gpu, int) or not -1 <= self.main_gpu < 2**31:
            raise InvalidConfigError(f"main_gpu must be a device index (0, 1, ...), not {self.main_gpu!r}.")
        if self.split_mode not in SPLIT_MODES:
            raise InvalidConfigError(f"split_mode must be one of {', '.join(SPLIT_MODES)}, not {self.split_mode!r}.")
        if not isinstance(self.tensor_split, tuple) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                for x in self.tensor_split) or (self.tensor_split and not any(self.tensor_split)):
            raise InvalidConfigError("tensor_split must be proportions, one per device, such as (3, 1); "
                                     f"not {self.tensor_split!r}.")
        if isinstance(self.rpc_servers, str) or not isinstance(self.rpc_servers, tuple):
            raise InvalidConfigError("rpc_servers must be a list of HOST:PORT addresses.")
        for address in self.rpc_servers:
            _parse_address(address)

    @classmethod
    def of(cls, *, n_gpu_layers: int = 0, main_gpu: int = 0, split_mode: str = "layer",
           tensor_split: Sequence[float] | None = None, rpc_servers: Sequence[str] | None = None) -> DeviceOptions:
        return cls(n_gpu_layers, main_gpu, split_mode, _as_tuple("tensor_split", tensor_split),
                   _as_tuple("rpc_servers", rpc_servers))

    def apply(self, library: Any, params: Any) -> list[Any]:
        """Set ``params`` (llama_model_params); returns the C arrays ``params`` points to, which must
        stay alive until the model is loaded."""
        ffi, lib = library.ffi, library.lib
        keep: list[Any] = []
        params.n_gpu_layers = self.n_gpu_layers
        params.main_gpu = self.main_gpu
        params.split_mode = getattr(lib, SPLIT_MODES[self.split_mode])
        if self.tensor_split:
            limit = lib.llama_max_devices()
            if len(self.tensor_split) > limit:
                raise InvalidConfigError(f"tensor_split has {len(self.tensor_split)} parts; this build takes at "
                                         f"most {limit} devices.")
            split = ffi.new("float[]", [float(x) for x in self.tensor_split] + [0.0] * (limit - len(self.tensor_split)))
            params.tensor_split = split
            keep.append(split)
        if self.rpc_servers or _registered:
            # Name the devices: RPC servers first (as llama-server orders them), then the local GPUs —
            # never RPC servers another model of this process registered.
            wanted = [device for address in self.rpc_servers for device in rpc_devices(library, address)]
            wanted += [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())
                       if _is_local_gpu(library, lib.ggml_backend_dev_get(i))]
            devices = ffi.new("ggml_backend_dev_t[]", [*wanted, ffi.NULL])
            params.devices = devices
            keep.append(devices)
        return keep

    def relays_after_load(self, library: Any, ptr: Any) -> Relays:
        """The relays of this placement's RPC servers, after ``llama_model_load_from_file`` returned
        ``ptr``: RpcServerLostError (``ptr`` freed) if a server went away while the weights were sent."""
        with _register_lock:
            relays = Relays(_registered[address][0] for address in self.rpc_servers)
        error = relays.error()
        if error is not None:
            if ptr != library.ffi.NULL:
                library.lib.llama_model_free(ptr)
            raise error
        return relays

    def offloads(self, library: Any) -> bool:
        """Whether layers leave this machine's CPU: then its contexts need not take turns on it."""
        if self.n_gpu_layers == 0:
            return False
        if self.rpc_servers:
            return True
        lib = library.lib
        return any(_is_local_gpu(library, lib.ggml_backend_dev_get(i)) for i in range(lib.ggml_backend_dev_count()))


def one_line_aborts(library: Any) -> None:
    """When ggml ends this process (an abort the RPC relay does not prevent), say why in one line on standard
    error instead of ggml's debugger backtrace (for `serve --rpc`'s serving process, which its supervisor
    restarts)."""
    if _abort_callback:
        return
    ffi, lib = library.ffi, library.lib

    def report(message: Any) -> None:
        text = ffi.string(message).decode("utf-8", "replace").strip() if message != ffi.NULL else "no message"
        sys.stderr.write(f"mullama: llama.cpp ended the process: {text}\n")
        sys.stderr.flush()

    callback = ffi.callback("ggml_abort_callback_t", report)
    _abort_callback.append(callback)
    lib.ggml_set_abort_callback(callback)


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise InvalidConfigError(f"{name} must be a list, not {value!r}.")
    return tuple(value)


def _is_local_gpu(library: Any, device: Any) -> bool:
    ffi, lib = library.ffi, library.lib
    kind = lib.ggml_backend_dev_type(device)
    if kind not in (lib.GGML_BACKEND_DEVICE_TYPE_GPU, lib.GGML_BACKEND_DEVICE_TYPE_IGPU):
        return False
    return not ffi.string(lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(device))).startswith(b"RPC")
