"""The pre-flight: check a GGUF file's header before llama.cpp sees it (run by ``Model.load``).

``preflight`` parses the header with the reader (``_reader``, which knows nothing of these checks) and
refuses, with ModelLoadError naming the key, what llama.cpp asserts on -- an assertion aborts the
whole process instead of returning an error: a layer count outside 1..LLAMA_MAX_LAYERS, expert counts
that contradict each other, an unknown RoPE scaling type, a NaN or negative norm epsilon (at the first
decode), a vocabulary with a duplicated token. It also refuses vocabulary arrays of inconsistent
lengths and tensors whose data would lie outside the file. A vocabulary found free of duplicates is
remembered (in this process, and as a marker file in the cache) so that the next load skips that check.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

from .._exceptions import ModelLoadError
from ._reader import (
    _STRUCTS,
    _U64,
    ARRAY,
    BOOL,
    FLOAT32,
    FLOAT64,
    GGUF_DEFAULT_ALIGNMENT,
    INT32,
    LLAMA_MAX_EXPERTS,
    LLAMA_MAX_LAYERS,
    MAX_DIMS,
    STRING,
    UINT32,
    GGUFInfo,
    _Array,
    _Header,
    _one_string,
    _read,
)

__all__ = ["check_model_file", "preflight"]

GGUF_MAGIC = b"GGUF"


def check_model_file(path: Path) -> None:
    """Fail early, with a clear message, on files llama.cpp would only log about."""
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL in the path
        raise ModelLoadError(f"{str(path)[:200]!r} cannot be a model file ({getattr(exc, 'strerror', None) or exc}); "
                             "pass the path of a .gguf file, or a model name such as 'smollm2:135m'.") from None
    if not exists:
        raise ModelLoadError(f"model file not found: {path}. Check the path, or pass a model name "
                             "such as 'smollm2:135m' to download one.")
    if not is_file:
        raise ModelLoadError(f"{path} is not a file; pass the path of a .gguf model file.")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror}.") from exc
    if magic != GGUF_MAGIC:
        what = "is empty" if not magic else "is not a GGUF file (wrong magic bytes)"
        raise ModelLoadError(f"{path} {what}. mullama loads GGUF models; convert others with "
                             "llama.cpp's convert_hf_to_gguf.py, or download a .gguf file.")


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


@functools.cache
def _split_patterns() -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """A run of 1-4096 short strings, and one short string (to split a run into strings)."""
    one = _one_string()
    return re.compile(rb"(?:%s){1,4096}" % one, re.DOTALL), re.compile(one, re.DOTALL)


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
