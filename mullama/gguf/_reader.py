"""Read a GGUF file's header (metadata and tensor shapes) without loading the model, and check it
before llama.cpp sees it.

``read_gguf_info`` parses the header (``mullama show``). ``preflight`` (run by ``Model.load``) parses
it too and refuses, with ModelLoadError naming the key, what llama.cpp asserts on -- an assertion
aborts the whole process instead of returning an error: a layer count outside 1..LLAMA_MAX_LAYERS,
expert counts that contradict each other, an unknown RoPE scaling type, a NaN or negative norm
epsilon (at the first decode), a vocabulary with a duplicated token. It also refuses vocabulary
arrays of inconsistent lengths and tensors whose data would lie outside the file.

The reader is iterative (nested arrays are walked with an explicit stack of bounded depth) and
bounded: every count and length is checked against the bytes left in the file before anything is
read or allocated, and the header may not exceed MAX_HEADER bytes. Long string arrays (a 262k-token
vocabulary) are stepped over by a regular expression, in C, not by a Python loop per string.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .._exceptions import ModelLoadError

__all__ = ["GGUFInfo", "preflight", "read_gguf_info"]

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


@functools.cache
def _split_patterns() -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """A run of 1-4096 short strings, and one short string (to split a run into strings)."""
    one = _one_string()
    return re.compile(rb"(?:%s){1,4096}" % one, re.DOTALL), re.compile(one, re.DOTALL)


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


# --- the pre-flight ---------------------------------------------------------------------------
def preflight(path: str | os.PathLike, *, vocab_only: bool = False) -> GGUFInfo:
    """Parse the header of ``path`` and refuse what llama.cpp would assert on (ModelLoadError naming the
    key). Metadata only: a few ms on a small model, tens of ms on a 262k-token vocabulary."""
    header = _read(path)
    _Checks(header, vocab_only).run()
    return header.info()


# tokenizer.ggml.model values that reach llama.cpp's token loop and its uniqueness assertion
# (llama_vocab::impl::load, src/llama-vocab.cpp); "no_vocab" and "none" return before it, and any
# other name is refused there with an exception.
_VOCABS_WITH_TOKENS = {"llama", "bert", "gpt2", "hybriddna", "whitespace", "t5", "rwkv", "test", "plamo2", "gemma4"}
_ROPE_SCALING_TYPES = {"none", "linear", "yarn", "longrope"}  # LLAMA_ROPE_SCALING_TYPES (src/llama-model.cpp)
_EPSILON = re.compile(r"_eps(?:ilon)?$")
_UNIQUE_TOKENS_TAG = b"mullama: tokenizer.ggml.tokens has no duplicate (v1)\0"
_unique_vocabularies: set[str] = set()


class _Checks:
    def __init__(self, header: _Header, vocab_only: bool) -> None:
        self.header, self.vocab_only = header, vocab_only
        # llama.cpp finds a key with strcmp (gguf_find_key): the first pair whose key, up to a NUL, matches.
        self.lookup: dict[str, str] = {}
        for key in header.kinds:
            self.lookup.setdefault(key.split("\0", 1)[0], key)

    def refuse(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.header.path}: {what}. llama.cpp would abort the process on this file, so "
                              "mullama refuses it: the file is corrupt or was crafted. Download it again "
                              "(`mullama pull` re-verifies a model it knows), or use another file.")

    def find(self, key: str, kind: int) -> tuple[str, Any] | None:
        """The stored key and value llama.cpp reads for ``key`` if it has type ``kind`` (llama.cpp's typed
        getters refuse any other type with an exception, so nothing aborts then)."""
        stored = self.lookup.get(key)
        if stored is None or self.header.kinds[stored] != kind:
            return None
        value = self.header.values[stored]
        return stored, value.split("\0", 1)[0] if kind == STRING else value  # read as a C string

    def u32(self, key: str, default: int | None = None) -> int | None:
        found = self.find(key, UINT32)
        return default if found is None else found[1]

    def array(self, key: str) -> _Array | None:
        stored = self.lookup.get(key)
        return None if stored is None or self.header.kinds[stored] != ARRAY else self.header.arrays[stored]

    def array_values(self, array: _Array) -> list[int]:
        unpacker = _STRUCTS[array.kind]
        return [unpacker.unpack_from(self.header.data, array.start + i * unpacker.size)[0] for i in range(array.count)]

    def run(self) -> None:
        header = self.header
        if header.duplicates:
            raise self.refuse(f"the key {header.duplicates[0]!r} appears twice")
        found = self.find("general.architecture", STRING)
        arch = found[1] if found else None
        if arch is not None and arch != "clip" and not self.vocab_only:
            self.hyperparameters(arch)
        if not self.vocab_only:
            self.epsilons()
        self.vocabulary()
        self.tensors()

    def hyperparameters(self, arch: str) -> None:
        """The GGML_ASSERTs of llama_model_base::load_hparams (src/llama-model.cpp) on generic keys."""
        key = f"{arch}.block_count"
        n_layer = self.u32(key)
        if n_layer is None:
            return  # missing or not a uint32: llama.cpp throws (a clean error)
        if not 1 <= n_layer <= LLAMA_MAX_LAYERS:
            raise self.refuse(f"{key} is {n_layer}; llama.cpp handles 1 to {LLAMA_MAX_LAYERS} layers "
                              "(LLAMA_MAX_LAYERS)")
        nextn = self.u32(f"{arch}.nextn_predict_layers", 0) or 0
        if nextn > n_layer:
            raise self.refuse(f"{arch}.nextn_predict_layers is {nextn}, more than {key} ({n_layer})")
        if arch == "wavtokenizer-dec":
            for part in ("posnet", "convnext"):
                layers = self.u32(f"{arch}.{part}.block_count", 0) or 0
                if layers > n_layer:
                    raise self.refuse(f"{arch}.{part}.block_count is {layers}, more than {key} ({n_layer})")
        self.experts(arch, n_layer)
        self.heads(arch, n_layer)
        found = self.find(f"{arch}.rope.scaling.type", STRING)
        if found is not None and found[1] not in _ROPE_SCALING_TYPES:
            raise self.refuse(f"{found[0]} is {found[1]!r}, not one of {', '.join(sorted(_ROPE_SCALING_TYPES))}")

    def per_layer(self, key: str, n_layer: int) -> list[int] | None:
        """What llama.cpp's get_key_or_arr reads: one uint32 for every layer, or an array of n_layer
        integers (any other type or length makes it throw); None if neither."""
        value = self.u32(key)
        if value is not None:
            return [value] * n_layer
        array = self.array(key)
        if array is not None and array.count == n_layer and array.kind in (BOOL, UINT32, INT32):
            return [int(v) & 0xFFFFFFFF for v in self.array_values(array)]
        return None

    def experts(self, arch: str, n_layer: int) -> None:
        n_expert = self.u32(f"{arch}.expert_count", 0) or 0
        used_key = f"{arch}.expert_used_count"
        used = self.per_layer(used_key, n_layer) or [0]
        groups = self.u32(f"{arch}.expert_group_count", 0) or 0
        groups_used = self.u32(f"{arch}.expert_group_used_count", 0) or 0
        if arch in ("hunyuan_vl", "hunyuan-dense") and n_expert <= 1:
            n_expert, used = 0, [0]
        used_max = max(used, default=0)
        problem = None
        if n_expert > LLAMA_MAX_EXPERTS:
            problem = f"{arch}.expert_count is {n_expert}, more than LLAMA_MAX_EXPERTS ({LLAMA_MAX_EXPERTS})"
        elif used_max > n_expert:
            problem = f"{used_key} is {used_max}, more than {arch}.expert_count ({n_expert})"
        elif n_expert > 0 and used_max == 0:
            problem = f"{used_key} is 0 with {n_expert} experts"
        elif n_expert > 0 and groups >= n_expert:
            problem = f"{arch}.expert_group_count is {groups}, not fewer than the {n_expert} experts"
        elif n_expert > 0 and groups > 1 and (n_expert % groups or not 0 < groups_used < groups):
            problem = (f"{arch}.expert_group_count ({groups}) and {arch}.expert_group_used_count ({groups_used}) "
                       f"do not fit {n_expert} experts")
        elif n_expert == 0 and groups:
            problem = f"{arch}.expert_group_count is {groups} without experts"
        if problem:
            raise self.refuse(problem)

    def heads(self, arch: str, n_layer: int) -> None:
        """Attention heads. llama.cpp computes a layer's K/V width as head size x KV heads in uint32 and
        broadcasts the KV heads over the query heads: a KV head count that does not divide the head count,
        or a width that wraps around (so that the tensor shapes still check out at load), makes ggml
        assert at the first decode (crafted or corrupt files: a flipped high byte of head_count_kv)."""
        head_key, kv_key = f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"
        heads = self.per_layer(head_key, n_layer)
        if heads is None:
            return
        kvs = self.per_layer(kv_key, n_layer) or heads
        n_embd = self.u32(f"{arch}.embedding_length", 0) or 0
        default = n_embd // heads[0] if heads[0] else 0
        sizes = [self.u32(f"{arch}.attention.{part}_length", default) or 0 for part in ("key", "value")]
        for layer, (n_head, n_kv) in enumerate(zip(heads, kvs)):
            if not n_head:
                continue  # a layer without attention (recurrent layers of hybrid models)
            if n_kv and n_head % n_kv:
                raise self.refuse(f"{kv_key} is {n_kv} for layer {layer}, which does not divide {head_key} "
                                  f"({n_head})")
            if max(sizes) * max(n_head, n_kv) >= 1 << 32:
                raise self.refuse(f"{head_key} ({n_head}) and {kv_key} ({n_kv}) times the head size "
                                  f"({max(sizes)}) overflow 32 bits")

    def epsilons(self) -> None:
        """Norm epsilons: ggml's norm kernels GGML_ASSERT(eps >= 0) at the first decode (NaN fails it)."""
        for key, stored in self.lookup.items():
            if _EPSILON.search(key) and self.header.kinds[stored] in (FLOAT32, FLOAT64):
                value = self.header.values[stored]
                if not (math.isfinite(value) and value > 0):
                    raise self.refuse(f"{stored} is {value}; a norm epsilon must be a small positive number")

    def vocabulary(self) -> None:
        """What llama_vocab::impl::load (src/llama-vocab.cpp) needs: the token list's companions as long as
        it, and no token twice (GGML_ASSERT(id_to_token.size() == token_to_id.size()))."""
        found = self.find("tokenizer.ggml.model", STRING)
        if found is None or found[1] not in _VOCABS_WITH_TOKENS:
            return
        key = "tokenizer.ggml.tokens"
        tokens = self.array(key)
        if tokens is None:
            return  # missing, or not an array: llama.cpp throws
        if tokens.kind != STRING:
            raise self.refuse(f"{key} is not a list of strings")
        for name, kinds in (("tokenizer.ggml.scores", (FLOAT32, INT32)), ("tokenizer.ggml.token_type", (INT32,))):
            companion = self.array(name)
            if companion is None:
                continue
            if companion.kind not in kinds:
                raise self.refuse(f"{name} holds values of GGUF type {companion.kind}, not numbers")
            if companion.count < tokens.count:
                raise self.refuse(f"{name} has {companion.count} entries for {tokens.count} tokens")
        self.unique_tokens(key, tokens)

    def unique_tokens(self, key: str, tokens: _Array) -> None:
        data = self.header.data
        digest = hashlib.sha256(_UNIQUE_TOKENS_TAG + _U64.pack(tokens.count))
        with memoryview(data) as view:
            digest.update(view[tokens.start:tokens.end])
        name = digest.hexdigest()
        marker = _checked_dir() / f"unique-tokens-{name}"
        if name in _unique_vocabularies or marker.exists():
            _unique_vocabularies.add(name)
            return
        texts, prefixed = _token_texts(data, tokens)
        if len(set(texts)) != len(texts):
            first: dict[bytes, int] = {}
            for index, text in enumerate(texts):
                earlier = first.setdefault(text, index)
                if earlier != index:
                    shown = text[8:] if prefixed else text
                    raise self.refuse(f"{key} holds the token {shown.decode('utf-8', 'replace')!r} twice "
                                      f"(ids {earlier} and {index})")
        _unique_vocabularies.add(name)
        with contextlib.suppress(OSError):  # a read-only cache only costs the check again next time
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()

    def tensors(self) -> None:
        header = self.header
        found = self.lookup.get("general.alignment")
        alignment = GGUF_DEFAULT_ALIGNMENT
        if found is not None:
            if header.kinds[found] != UINT32:
                raise self.refuse("general.alignment is not a uint32")
            alignment = header.values[found]
            if alignment == 0 or alignment & (alignment - 1):
                raise self.refuse(f"general.alignment is {alignment}, not a power of 2")
        end = header.tensors_span[1]
        data_start = end + (-end % alignment) if header.tensors else end
        from ..native._library import get

        lib = get().lib
        n_types = lib.GGML_TYPE_COUNT
        for tensor in header.tensors:
            name = tensor.name.decode("utf-8", "replace")
            dims = tensor.dims + [1] * (MAX_DIMS - len(tensor.dims))
            if any(d >= 1 << 63 for d in dims):
                raise self.refuse(f"the tensor {name!r} has a negative dimension")
            if not 0 <= tensor.kind < n_types or lib.ggml_blck_size(tensor.kind) == 0:
                raise self.refuse(f"the tensor {name!r} has the unknown ggml type {tensor.kind}")
            block = lib.ggml_blck_size(tensor.kind)
            if dims[0] % block:
                raise self.refuse(f"the tensor {name!r} has rows of {dims[0]} values, not a multiple of its type's "
                                  f"block of {block}")
            nbytes = lib.ggml_type_size(tensor.kind) * (dims[0] // block) * dims[1] * dims[2] * dims[3]
            if data_start + tensor.offset + nbytes > header.size:
                raise self.refuse(f"the data of the tensor {name!r} ({nbytes} bytes at {data_start + tensor.offset}) "
                                  f"lies beyond the end of the file ({header.size} bytes): the file is truncated")


def _token_texts(data: bytes | bytearray, tokens: _Array) -> tuple[list[bytes], bool]:
    """The tokens as llama.cpp keys them: a C string (cut at a NUL), an empty one as ``[EMPTY_<id>]``.
    Without NULs and empty tokens each token comes with its length prefix (equally unique; then True)."""
    run, one = _split_patterns()
    records: list[bytes] = []
    pos, end, long_prefix_nuls, n_long = tokens.start, tokens.end, 0, 0
    while pos < end:
        match = run.match(data, pos, end)
        if match is not None:
            records += one.findall(data, pos, match.end())
            pos = match.end()
        else:  # a token of 256 bytes or more
            length = _U64.unpack_from(data, pos)[0]
            records.append(bytes(data[pos:pos + 8 + length]))
            long_prefix_nuls += data.count(b"\0", pos, pos + 8)
            n_long += 1
            pos += 8 + length
    if len(records) != tokens.count:  # cannot happen: the header parse stepped over exactly these
        raise ModelLoadError(f"cannot split tokenizer.ggml.tokens into {tokens.count} tokens.")
    n_empty = records.count(b"\0" * 8)
    # Short records' length prefixes hold 7 NULs each (an empty one 8): any other NUL is inside a token.
    nuls_in_text = data.count(b"\0", tokens.start, end) - 7 * (len(records) - n_long) - n_empty - long_prefix_nuls
    if not n_empty and not nuls_in_text:
        return records, True
    return [r[8:].split(b"\0", 1)[0] or b"[EMPTY_%d]" % i for i, r in enumerate(records)], False


def _checked_dir() -> Path:
    from .._paths import cache_root

    return cache_root() / "checked"
