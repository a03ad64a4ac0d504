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

# llama_ftype values (llama.h) -> the usual names
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
    19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
    26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
    36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4",
}


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
        handle = open(path, "rb")
    except OSError as exc:
        raise ModelLoadError(f"cannot open {path}: {exc.strerror}.") from exc
    with handle:
        reader = _Reader(handle, path)
        if handle.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file.")
        version = reader.unpack("<I")
        n_tensors, n_kv = reader.unpack("<Q"), reader.unpack("<Q")
        if n_tensors > MAX_ITEMS or n_kv > MAX_ITEMS:
            raise ModelLoadError(f"{path}: implausible GGUF header counts; the file is corrupt.")
        metadata = {}
        for _ in range(n_kv):
            key = reader.string()
            metadata[key] = reader.value(reader.unpack("<I"))
        n_params, types = 0, {}
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
