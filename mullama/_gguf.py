"""Read a GGUF file's header (metadata and tensor shapes) without loading the model."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ._exceptions import ModelLoadError

__all__ = ["GGUFInfo", "read_gguf_info"]

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_STRING = 64 << 20  # a header string longer than this means a corrupt file
MAX_ITEMS = 1 << 24

# Spellings that differ from the llama_ftype enum name (LLAMA_FTYPE_MOSTLY_<name> / LLAMA_FTYPE_ALL_<name>).
_SPELLINGS = {"MXFP4_MOE": "MXFP4"}
GUESSED = "LLAMA_FTYPE_GUESSED"  # a flag llama.cpp adds when a file does not say its type, not a type


def _file_types() -> tuple[dict[int, str], int]:
    """llama_ftype values -> the usual names (``LLAMA_FTYPE_MOSTLY_Q4_K_M`` -> ``Q4_K_M``), read from the
    generated bindings (only the ffi type table: nothing is loaded), and the value of the GUESSED flag."""
    from ._library import _bindings

    ffi = _bindings()[0]
    names: dict[int, str] = {}
    guessed = 0
    for value, name in ffi.typeof("enum llama_ftype").elements.items():
        if name == GUESSED:
            guessed = value
            continue
        short = name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
        names[value] = _SPELLINGS.get(short, short)
    return names, guessed


FILE_TYPES, GUESSED_FLAG = _file_types()


@dataclass
class GGUFInfo:
    """What a GGUF header says."""

    path: Path
    version: int
    metadata: dict[str, Any]
    n_tensors: int
    n_params: int
    size_bytes: int = 0
    tensor_types: dict[int, int] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    @property
    def context_length(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None

    @property
    def quantization(self) -> str:
        file_type = self.metadata.get("general.file_type")
        if isinstance(file_type, int):
            if GUESSED_FLAG and file_type & GUESSED_FLAG:
                return f"{FILE_TYPES.get(file_type & ~GUESSED_FLAG, 'unknown')} (guessed)"
            return FILE_TYPES.get(file_type, f"type {file_type}")
        return "unknown"

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    def summary(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "name": self.metadata.get("general.name"),
            "parameters": self.n_params,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "chat_template": self.chat_template is not None,
            "size_bytes": self.size_bytes,
            "gguf_version": self.version,
        }


class _Reader:
    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle, self.path = handle, path

    def take(self, n: int) -> bytes:
        data = self.handle.read(n)
        if len(data) != n:
            raise ModelLoadError(f"{self.path} ends inside its GGUF header: the file is truncated.")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        length = self.unpack("<Q")
        if length > MAX_STRING:
            raise ModelLoadError(f"{self.path}: a GGUF header string of {length} bytes; the file is corrupt.")
        return self.take(length).decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.unpack("<I"), self.unpack("<Q")
            if count > MAX_ITEMS:
                raise ModelLoadError(f"{self.path}: a GGUF array of {count} items; the file is corrupt.")
            if item_kind in _SCALARS:  # large arrays (token scores, ...) are skipped, only counted
                self.handle.seek(struct.calcsize(_SCALARS[item_kind]) * count, os.SEEK_CUR)
                return f"<{count} items>"
            return [self.value(item_kind) for _ in range(count)] if count <= 64 else self._skip(item_kind, count)
        raise ModelLoadError(f"{self.path}: unknown GGUF value type {kind}; the file is corrupt or too new.")

    def _skip(self, item_kind: int, count: int) -> str:
        for _ in range(count):
            self.value(item_kind)
        return f"<{count} items>"


def read_gguf_info(path: str | os.PathLike) -> GGUFInfo:
    """Parse the header of the GGUF file at ``path``; ModelLoadError if it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _read_header(_Reader(handle, path))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}.") from exc


def _read_header(reader: _Reader) -> GGUFInfo:
    path = reader.path
    if reader.handle.read(4) != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file.")
    version = reader.unpack("<I")
    n_tensors, n_kv = reader.unpack("<Q"), reader.unpack("<Q")
    if n_tensors > MAX_ITEMS or n_kv > MAX_ITEMS:
        raise ModelLoadError(f"{path}: implausible GGUF header counts; the file is corrupt.")
    metadata = {}
    for _ in range(n_kv):
        key = reader.string()
        metadata[key] = reader.value(reader.unpack("<I"))
    n_params = 0
    types: dict[int, int] = {}
    for _ in range(n_tensors):
        reader.string()
        n_dims = reader.unpack("<I")
        if n_dims > 8:
            raise ModelLoadError(f"{path}: a tensor with {n_dims} dimensions; the file is corrupt.")
        count = 1
        for _ in range(n_dims):
            count *= reader.unpack("<Q")
        kind = reader.unpack("<I")
        reader.unpack("<Q")  # offset
        n_params += count
        types[kind] = types.get(kind, 0) + 1
    return GGUFInfo(path, version, metadata, n_tensors, n_params, path.stat().st_size, types)
