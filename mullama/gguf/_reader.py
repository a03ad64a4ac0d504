"""Read a GGUF file's header (metadata and tensor shapes) without loading the model: the pure reader.

``read_gguf_info`` parses the header (``mullama show``, the server's model details); ``_read`` gives
the whole parse (``_Header``: every key's type, value and place in the file, the arrays, the tensor
descriptions) to the pre-flight (``_preflight``), which is built on top of this module and is never
imported by it. Nothing here decides whether llama.cpp may load a file.

The reader is iterative (nested arrays are walked with an explicit stack of bounded depth) and
bounded: every count and length is checked against the bytes left in the file before anything is
read or allocated, and the header may not exceed MAX_HEADER bytes. Long string arrays (a 262k-token
vocabulary) are stepped over by a regular expression, in C, not by a Python loop per string.
"""

from __future__ import annotations

import functools
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .._exceptions import ModelLoadError

__all__ = ["GGUFInfo", "read_gguf_info"]

# GGUF value types (ggml/include/gguf.h).
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_STRUCTS = {kind: struct.Struct(fmt) for kind, fmt in {
    UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<?",
    UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}.items()}
_U32, _U64 = _STRUCTS[UINT32], _STRUCTS[UINT64]
_MIN_SIZE = {**{kind: s.size for kind, s in _STRUCTS.items()}, STRING: 8, ARRAY: 12}  # bytes per item, at least

MAX_STRING = 64 << 20   # a header string longer than this means a corrupt file
MAX_ITEMS = 1 << 24     # items in one array, tensors, key/value pairs
MAX_HEADER = 256 << 20  # metadata and tensor descriptions together (real models: a few MB)
MAX_NESTING = 8         # arrays of arrays (llama.cpp itself accepts none)
MAX_DIMS = 4            # GGML_MAX_DIMS (ggml/include/ggml.h)
SHOWN_STRINGS = 64      # string arrays up to this length are kept in GGUFInfo.metadata; longer ones counted
# llama.cpp's limits at the pinned commit (src/llama-hparams.h, lines 11-12):
#   #define LLAMA_MAX_LAYERS  512
#   #define LLAMA_MAX_EXPERTS 1024
# llama_model_base::load_hparams (src/llama-model.cpp) GGML_ASSERTs n_layer in 1..LLAMA_MAX_LAYERS.
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
GGUF_DEFAULT_ALIGNMENT = 32  # ggml/include/gguf.h

# Spellings that differ from the llama_ftype enum name (LLAMA_FTYPE_MOSTLY_<name> / LLAMA_FTYPE_ALL_<name>).
_SPELLINGS = {"MXFP4_MOE": "MXFP4"}
GUESSED = "LLAMA_FTYPE_GUESSED"  # a flag llama.cpp adds when a file does not say its type, not a type


def _file_types() -> tuple[dict[int, str], int]:
    """llama_ftype values -> the usual names (``LLAMA_FTYPE_MOSTLY_Q4_K_M`` -> ``Q4_K_M``), read from the
    generated bindings (only the ffi type table: nothing is loaded), and the value of the GUESSED flag."""
    from ..native._library import _bindings

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


# --- stepping over string arrays in C -------------------------------------------------------
# A GGUF string is a little-endian uint64 length, then the bytes. One shorter than 256 bytes is its
# length's low byte, seven zero bytes and the text: one alternative per length lets the regular
# expression engine step over a run of them without a Python loop per string. Longer strings (rare
# in vocabularies) are stepped over one by one.
_CHUNK = 256  # strings per match when skipping
_WINDOW = _CHUNK * (8 + 255)


def _one_string() -> bytes:
    return b"|".join([rb"\x00{8}"] + [re.escape(bytes([n])) + rb"\x00{7}" + rb".{%d}" % n for n in range(1, 256)])


@functools.cache
def _skip_pattern() -> re.Pattern[bytes]:
    """Exactly _CHUNK consecutive short strings (possessive: nothing to backtrack into, a little faster)."""
    return re.compile(rb"(?:%s){%d}+" % (_one_string(), _CHUNK), re.DOTALL)


# --- the reader ------------------------------------------------------------------------------
class _Reader:
    """The file's leading bytes, read on demand in growing chunks, parsed from ``pos``."""

    def __init__(self, handle: BinaryIO, path: Path, size: int) -> None:
        self.handle, self.path, self.size = handle, path, size
        self.data = bytearray()  # grows in place
        self.pos = 0

    def corrupt(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: {what}; the file is corrupt (or not a GGUF model). Download it again "
                              "(`mullama pull` re-verifies a model it knows), or use another file.")

    def fill(self, end: int) -> None:
        """Read the file up to ``end`` at least (in few large reads), as far as it and MAX_HEADER go."""
        have = len(self.data)
        target = min(self.size, MAX_HEADER, max(end, 2 * have, 4 << 20))
        if target > have:
            self.handle.seek(have)
            self.data += self.handle.read(target - have)  # (in place: a bytearray)

    def need(self, n: int) -> int:
        """Make sure ``n`` bytes follow ``pos`` (else: truncated, or a header too large); returns ``pos``."""
        end = self.pos + n
        if end > len(self.data):
            if end > self.size:
                raise ModelLoadError(f"{self.path} ends inside its GGUF header: the file is truncated. Download it "
                                     "again (`mullama pull` re-verifies and resumes).")
            if end > MAX_HEADER:
                raise self.corrupt(f"a GGUF header larger than {MAX_HEADER >> 20} MiB")
            self.fill(end)
            if end > len(self.data):
                raise ModelLoadError(f"{self.path} changed while it was read (it got shorter); try again.")
        return self.pos

    def advance(self, n: int) -> None:
        """Step over ``n`` bytes without reading them yet."""
        if n > self.size - self.pos:
            raise ModelLoadError(f"{self.path} ends inside its GGUF header: the file is truncated. Download it "
                                 "again (`mullama pull` re-verifies and resumes).")
        self.pos += n

    def u32(self) -> int:
        pos = self.need(4)
        self.pos = pos + 4
        return _U32.unpack_from(self.data, pos)[0]

    def u64(self) -> int:
        pos = self.need(8)
        self.pos = pos + 8
        return _U64.unpack_from(self.data, pos)[0]

    def scalar(self, kind: int) -> Any:
        unpacker = _STRUCTS[kind]
        pos = self.need(unpacker.size)
        self.pos = pos + unpacker.size
        return unpacker.unpack_from(self.data, pos)[0]

    def raw_string(self) -> bytes:
        length = self.u64()
        if length > MAX_STRING:
            raise self.corrupt(f"a GGUF header string of {length} bytes")
        pos = self.need(length)
        self.pos = pos + length
        return bytes(self.data[pos:pos + length])

    def string(self) -> str:
        return self.raw_string().decode("utf-8", "replace")

    def count(self, kind: int, count: int, what: str) -> int:
        """Check an array's item type and length before stepping over it."""
        if kind not in _MIN_SIZE:
            raise self.corrupt(f"{what} has the unknown GGUF value type {kind} (or the file is too new)")
        if count > MAX_ITEMS or count * _MIN_SIZE[kind] > self.size - self.pos:
            raise self.corrupt(f"{what} claims {count} items, more than the file can hold")
        return count

    def skip_strings(self, count: int) -> None:
        skip = _skip_pattern().match
        pos = self.pos
        while count:
            if count >= _CHUNK:
                if pos + _WINDOW > len(self.data):
                    self.fill(pos + _WINDOW)
                match = skip(self.data, pos)
                if match is not None:
                    pos = match.end()
                    count -= _CHUNK
                    continue
            # A long string among the next ones, the last few, or the end of what is read so far: step
            # over up to _CHUNK strings in Python (so that a string >= 256 bytes costs no retries).
            self.pos = pos
            for _ in range(min(count, _CHUNK)):
                length = self.u64()
                if length > MAX_STRING:
                    raise self.corrupt(f"a GGUF header string of {length} bytes")
                self.advance(length)
                count -= 1
            pos = self.pos
        self.pos = pos

    def skip_array(self, kind: int, count: int, what: str) -> None:
        """Step over ``count`` items of type ``kind`` (arrays of arrays too: iteratively, bounded in depth)."""
        stack = [(kind, count)]
        while stack:
            kind, left = stack.pop()
            if not left:
                continue
            if kind == STRING:
                self.skip_strings(left)
            elif kind == ARRAY:
                stack.append((ARRAY, left - 1))
                if len(stack) > MAX_NESTING:
                    raise self.corrupt(f"{what} has arrays nested more than {MAX_NESTING} deep")
                inner = self.u32()
                stack.append((inner, self.count(inner, self.u64(), what)))
            else:
                self.advance(_STRUCTS[kind].size * left)


@dataclass
class _Array:
    kind: int    # the items' type
    count: int
    start: int   # where the items start in _Header.data
    end: int


@dataclass
class _Tensor:
    name: bytes
    dims: list[int]
    kind: int
    offset: int


@dataclass
class _Header:
    """Everything a header holds, with where each key/value pair lies (``spans``, for tests that craft files)."""

    path: Path
    size: int
    version: int
    data: bytes | bytearray
    kinds: dict[str, int] = field(default_factory=dict)      # key -> type (ARRAY for arrays)
    values: dict[str, Any] = field(default_factory=dict)     # key -> value as GGUFInfo.metadata shows it
    arrays: dict[str, _Array] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (start, end) of its whole pair
    duplicates: list[str] = field(default_factory=list)
    tensors: list[_Tensor] = field(default_factory=list)
    tensors_span: tuple[int, int] = (0, 0)

    def info(self) -> GGUFInfo:
        n_params = 0
        types: dict[int, int] = {}
        for tensor in self.tensors:
            n_params += math.prod(tensor.dims)
            types[tensor.kind] = types.get(tensor.kind, 0) + 1
        return GGUFInfo(self.path, self.version, dict(self.values), len(self.tensors), n_params, self.size, types)


def _parse(handle: BinaryIO, path: Path) -> _Header:
    size = os.fstat(handle.fileno()).st_size
    reader = _Reader(handle, path, size)
    reader.fill(24)
    if reader.data[:4] != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file.")
    reader.pos = 4
    version, n_tensors, n_kv = reader.u32(), reader.u64(), reader.u64()
    # A key/value pair takes 13 bytes at least, a tensor's description 24.
    if n_kv > MAX_ITEMS or n_tensors > MAX_ITEMS or 13 * n_kv + 24 * n_tensors > size - reader.pos:
        raise reader.corrupt(f"the header claims {n_kv} key/value pairs and {n_tensors} tensors, more than the "
                             "file can hold")
    header = _Header(path, size, version, reader.data)
    for _ in range(n_kv):
        start = reader.pos
        key = reader.string()
        kind = reader.u32()
        if kind in _STRUCTS:
            value: Any = reader.scalar(kind)
        elif kind == STRING:
            value = reader.string()
        elif kind == ARRAY:
            item = reader.u32()
            count = reader.count(item, reader.u64(), key)
            first = reader.pos
            if item == STRING and count <= SHOWN_STRINGS:
                value = [reader.string() for _ in range(count)]
            else:
                reader.skip_array(item, count, key)
                value = f"<{count} items>"
            if key not in header.arrays:
                header.arrays[key] = _Array(item, count, first, reader.pos)
        else:
            raise reader.corrupt(f"{key} has the unknown GGUF value type {kind} (or the file is too new)")
        if key in header.kinds:
            header.duplicates.append(key)
            continue
        header.kinds[key], header.values[key], header.spans[key] = kind, value, (start, reader.pos)
    start = reader.pos
    for _ in range(n_tensors):
        name = reader.raw_string()
        n_dims = reader.u32()
        if n_dims > MAX_DIMS:
            raise reader.corrupt(f"the tensor {name.decode('utf-8', 'replace')!r} has {n_dims} dimensions")
        dims = [reader.u64() for _ in range(n_dims)]
        header.tensors.append(_Tensor(name, dims, reader.u32(), reader.u64()))
    header.tensors_span = (start, reader.pos)
    header.data = reader.data
    return header


def _read(path: str | os.PathLike) -> _Header:
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _parse(handle, path)
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise ModelLoadError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}.") from exc


def read_gguf_info(path: str | os.PathLike) -> GGUFInfo:
    """Parse the header of the GGUF file at ``path``; ModelLoadError if it is not one."""
    return _read(path).info()
