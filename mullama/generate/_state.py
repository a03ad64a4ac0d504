"""Saved KV states: one sequence's keys and values, with its tokens and the model that made them.

``Context.save_state`` / ``load_state`` (and their bytes forms) and the server's
``/slots/{id}?action=save|restore`` write and read one format::

    b"MULLAMA\\x00STATE\\x00\\x00\\x00"      16 bytes: what this is
    version                                    uint32 LE (1)
    header length                              uint32 LE
    header                                     JSON: the model's fingerprint, n_tokens, state_bytes
    tokens                                     n_tokens int32 LE, in order
    state                                      state_bytes: llama_state_seq_get_data's bytes
    sha256                                     32 bytes, of everything before it

Everything is checked before llama.cpp sees a byte: the magic (NotAStateFileError), the lengths and
the checksum (StateCorruptError), the model (StateModelMismatchError), the token count against the
context (ContextOverflowError) and the token ids against the vocabulary. A file is written to a
temporary name beside the target and renamed over it, so no reader ever sees half of one.

The LoRA adapters the cells were computed with are recorded too (file name, a digest as the
model's, scale); loading needs them loaded on the model (else StateModelMismatchError).
The model's fingerprint is a sha256 of the GGUF file's size, its first and last MiB (the header,
with every tensor's name, shape and type; the last tensor's data, where two fine-tunes of one base
differ), with the architecture, parameter count and vocabulary size kept in clear for the message.
The format is mullama's own: it is not llama.cpp's ``llama_state_seq_save_file`` format (that one
records no model, so llama-server cannot tell a slot file of another model).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

from .._exceptions import (
    ContextOverflowError,
    NotAStateFileError,
    StateCorruptError,
    StateError,
    StateModelMismatchError,
    TokenizeError,
)
from ._arguments import check_bytes, check_path
from ._lora import LoraSet
from ._model import Model
from ._positions import CachePositions

__all__ = ["MAGIC", "model_fingerprint", "pack_state", "read_state_file", "restore_sequence", "sequence_state",
           "set_sequence", "unpack_state", "write_atomically"]

MAGIC = b"MULLAMA\x00STATE\x00\x00\x00"
VERSION = 1
_FIXED = struct.Struct("<II")  # version, header length
_DIGEST = 32
_EDGE = 1 << 20  # bytes hashed at each end of the model file
MAX_HEADER = 1 << 16

_fingerprints: dict[tuple[str, int, int], dict[str, Any]] = {}
_fingerprints_lock = threading.Lock()


def model_fingerprint(model: Model) -> dict[str, Any]:
    """What identifies ``model``'s weights in a state (computed once per file version)."""
    path = Path(model.path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _fingerprints_lock:
        known = _fingerprints.get(key)
    if known is not None:
        return known
    fingerprint = {"sha256": _file_digest(path, stat.st_size),
                   "architecture": model._meta("general.architecture") or "", "n_params": model.n_params,
                   "vocab_size": model.vocab_size, "file_size": stat.st_size, "file_name": path.name}
    with _fingerprints_lock:
        _fingerprints[key] = fingerprint
    return fingerprint


def _file_digest(path: Path, size: int) -> str:
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as file:
        digest.update(file.read(_EDGE))
        file.seek(max(0, size - _EDGE))
        digest.update(file.read(_EDGE))
    return digest.hexdigest()


def _lora_record(adapters: LoraSet) -> list[dict[str, Any]]:
    """What identifies the LoRA adapters (and scales) a state's cells were computed with."""
    record = []
    for adapter, scale in adapters:
        size = adapter.path.stat().st_size
        record.append({"file_name": adapter.path.name, "sha256": _file_digest(adapter.path, size), "scale": scale})
    return record


def _resolve_lora(model: Model, record: Any, source: str) -> LoraSet:
    """The model's adapter set a state's LoRA ``record`` names; StateModelMismatchError when one of its
    adapters is not loaded on ``model``."""
    if not isinstance(record, list):
        raise StateCorruptError(f"{source} has a damaged header (its LoRA adapters); save it again.")
    adapters = []
    for entry in record:
        found = next((adapter for adapter in model.lora
                      if _lora_record(((adapter, 0.0),))[0]["sha256"] == entry.get("sha256")), None)
        if found is None:
            raise StateModelMismatchError(
                f"{source} was computed with the LoRA adapter {entry.get('file_name', '?')} (scale "
                f"{entry.get('scale')}), which this model has not loaded; load it (model.load_lora) first.")
        adapters.append((found, float(entry["scale"])))
    return tuple(sorted(adapters, key=lambda pair: pair[0].id))


# --- the format ------------------------------------------------------------------------------
def pack_state(model: Model, tokens: list[int], state: bytes, lora: LoraSet = ()) -> bytes:
    """The bytes of a state file for ``tokens`` whose KV state is ``state``, computed with ``lora``."""
    header = json.dumps({"model": model_fingerprint(model), "n_tokens": len(tokens), "state_bytes": len(state),
                         "lora": _lora_record(lora)}, sort_keys=True).encode()
    body = b"".join((MAGIC, _FIXED.pack(VERSION, len(header)), header, struct.pack(f"<{len(tokens)}i", *tokens),
                     state))
    return body + hashlib.sha256(body).digest()


def unpack_state(data: bytes | bytearray | memoryview, model: Model, *, n_ctx: int,
                 source: str = "the data") -> tuple[list[int], memoryview, LoraSet]:
    """The tokens, the KV state bytes and the LoRA adapters (of ``model``) of a state file's ``data``,
    checked for ``model`` and a sequence of ``n_ctx`` cells (see the module's docstring for what each
    failure raises)."""
    check_bytes("data", data)
    view = memoryview(data).cast("B")
    if len(view) < len(MAGIC) or view[: len(MAGIC)] != MAGIC:
        raise NotAStateFileError(f"{source} is not a mullama state (it does not start with its magic bytes); "
                                 "give a file written by Context.save_state or a server's slot save.")
    fixed_end = len(MAGIC) + _FIXED.size
    if len(view) < fixed_end + _DIGEST:
        raise StateCorruptError(f"{source} is truncated ({len(view)} bytes); save it again.")
    version, header_size = _FIXED.unpack(view[len(MAGIC):fixed_end])
    if version != VERSION:
        raise StateError(f"{source} is a state of format version {version}; this mullama reads version {VERSION}. "
                         "Save it again with this version.")
    if header_size > MAX_HEADER or fixed_end + header_size + _DIGEST > len(view):
        raise StateCorruptError(f"{source} is truncated or damaged (its header runs past its end); save it again.")
    body, digest = view[:-_DIGEST], view[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise StateCorruptError(f"{source} is damaged or truncated (its checksum does not match); save it again.")
    try:
        header = json.loads(bytes(view[fixed_end:fixed_end + header_size]))
        n_tokens, state_bytes, saved_model = int(header["n_tokens"]), int(header["state_bytes"]), header["model"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StateCorruptError(f"{source} has a damaged header ({exc}); save it again.") from None
    start = fixed_end + header_size
    if n_tokens < 0 or state_bytes < 0 or start + 4 * n_tokens + state_bytes != len(body):
        raise StateCorruptError(f"{source} is damaged (its lengths do not add up); save it again.")
    ours = model_fingerprint(model)
    if not isinstance(saved_model, dict) or saved_model.get("sha256") != ours["sha256"]:
        theirs = saved_model if isinstance(saved_model, dict) else {}
        raise StateModelMismatchError(
            f"{source} was saved by another model ({theirs.get('file_name', '?')}: {theirs.get('architecture', '?')}, "
            f"{theirs.get('n_params', '?')} parameters) than this one ({ours['file_name']}: {ours['architecture']}, "
            f"{ours['n_params']} parameters); load it into a context of the model that saved it.")
    if n_tokens > n_ctx:
        raise ContextOverflowError(f"{source} holds {n_tokens} tokens but the context holds {n_ctx}; "
                                   "load it into a context with a larger n_ctx.")
    lora = _resolve_lora(model, header.get("lora", []), source)
    tokens = list(struct.unpack_from(f"<{n_tokens}i", body, start))
    try:
        model._check_tokens(tokens)
    except TokenizeError as exc:
        raise StateCorruptError(f"{source} holds a token this model does not have ({exc}).") from None
    return tokens, body[start + 4 * n_tokens:], lora


def read_state_file(path: str | os.PathLike[str], *, limit: int | None = None) -> bytes:
    """A state file's bytes (``limit``: refuse a larger file, as StateCorruptError, before reading it)."""
    path = check_path("path", path)
    try:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if limit is not None and size > limit:
                raise StateCorruptError(f"{path.name} has {size} bytes, more than a state of this context can have "
                                        f"({limit}); it is not a state saved here.")
            return file.read()
    except IsADirectoryError:
        raise NotAStateFileError(f"{path} is a directory, not a state file.") from None
    except OSError as exc:
        raise StateError(f"cannot read the state file {path}: {exc.strerror or exc}.") from None


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_atomically(path: str | os.PathLike[str], data: bytes) -> int:
    """Write ``data`` to ``path`` through a temporary file beside it, renamed over it once complete
    and flushed to disk; nothing is left behind on failure (StateError). Returns the bytes written."""
    path = check_path("path", path)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StateError(f"cannot write the state file {path}: {exc.strerror or exc}.") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's file is 0600: give it the mode open() would
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise StateError(f"cannot write the state file {path}: {exc.strerror or exc}.") from None
        raise
    return len(data)


# --- one sequence of a llama context ---------------------------------------------------------------
def sequence_state(model: Model, ctx: Any, seq_id: int, tokens: list[int], lora: LoraSet = (),
                   positions: CachePositions | None = None) -> bytes:
    """The state file bytes of sequence ``seq_id`` of the llama context ``ctx`` (which holds ``tokens``,
    computed with the adapters ``lora``). Refused (StateError) for a cache holding an image at M-RoPE
    positions (``positions`` not empty, see mullama.generate._positions): the file keeps tokens, not where they sit."""
    if positions:
        raise StateError("this cache holds an image decoded at M-RoPE positions, which a state file does not "
                         "record; save the state before the image, or clear() and save a text-only one.")
    library = model._library
    ffi, lib = library.ffi, library.lib
    size = lib.llama_state_seq_get_size(ctx, seq_id)
    buffer = ffi.new("uint8_t[]", max(size, 1))
    written = lib.llama_state_seq_get_data(ctx, buffer, size, seq_id)
    if written != size:
        raise StateError(f"llama.cpp wrote {written} of the {size} bytes of the sequence's state; try again.")
    return pack_state(model, tokens, bytes(ffi.buffer(buffer, size)), lora)


def restore_sequence(model: Model, ctx: Any, seq_id: int, data: bytes | bytearray | memoryview, *,
                     n_ctx: int, source: str = "the data") -> list[int]:
    """Replace sequence ``seq_id`` of ``ctx`` by the state ``data``; returns its tokens. When a check
    fails (see ``unpack_state``) the sequence is untouched; when llama.cpp refuses the state, empty."""
    tokens, state, _lora = unpack_state(data, model, n_ctx=n_ctx, source=source)
    set_sequence(model, ctx, seq_id, tokens, state, source=source)
    return tokens


def set_sequence(model: Model, ctx: Any, seq_id: int, tokens: list[int], state: memoryview, *,
                 source: str = "the data") -> None:
    """Replace sequence ``seq_id`` of ``ctx`` by ``state`` (checked by ``unpack_state``), which holds
    ``tokens``; StateError, and the sequence left empty, when llama.cpp refuses it."""
    library = model._library
    ffi, lib = library.ffi, library.lib
    memory = lib.llama_get_memory(ctx)
    lib.llama_memory_seq_rm(memory, seq_id, -1, -1)
    if not tokens:
        return
    buffer = ffi.from_buffer("uint8_t[]", state)
    read = lib.llama_state_seq_set_data(ctx, buffer, len(state), seq_id)
    if read != len(state) or lib.llama_memory_seq_pos_max(memory, seq_id) != len(tokens) - 1:
        lib.llama_memory_seq_rm(memory, seq_id, -1, -1)
        raise StateError(f"llama.cpp could not restore {source} ({len(tokens)} tokens) into this context: its "
                         "KV cache has no room for it, or it was saved by a context of other settings "
                         "(flash attention, KV cache type).")
