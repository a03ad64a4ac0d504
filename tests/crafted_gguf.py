"""Crafted GGUF files for tests: a real model file rewritten with chosen metadata changed.

    craft(model_path, tmp_path / "x.gguf", {"llama.block_count": u32(0)})

parses the source with mullama's own reader, writes a valid GGUF whose key/value pairs are the
source's (in order, byte for byte) except those changed (a new value), dropped (None) or added
(``first`` before all others, new keys of ``changes`` after them), then the tensor descriptions
and the tensor data copied unchanged. With no change the result loads and generates exactly as
the source does.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

from mullama.gguf import _reader
from mullama.gguf._reader import ARRAY, FLOAT32, INT32, STRING, UINT32, UINT64

Value = tuple[int, bytes]  # a GGUF type and its encoded payload


def u32(value: int) -> Value:
    return UINT32, struct.pack("<I", value)


def f32(value: float) -> Value:
    return FLOAT32, struct.pack("<f", value)


def _string(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def string(text: str | bytes) -> Value:
    return STRING, _string(text.encode() if isinstance(text, str) else text)


def strings(items: list[bytes]) -> Value:
    return ARRAY, struct.pack("<IQ", STRING, len(items)) + b"".join(_string(item) for item in items)


def numbers(kind: int, fmt: str, items: list) -> Value:
    return ARRAY, struct.pack("<IQ", kind, len(items)) + struct.pack(f"<{len(items)}{fmt}", *items)


def nested_arrays(depth: int) -> Value:
    """An array holding an array holding ... ``depth`` deep, the innermost empty (of uint32)."""
    return ARRAY, struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", UINT32, 0)


def header(path: Path) -> _reader._Header:
    return _reader._read(path)


def read_strings(path: Path, key: str) -> list[bytes]:
    """The items of a string array (a vocabulary, ...) of ``path``."""
    parsed = header(path)
    array = parsed.arrays[key]
    assert array.kind == STRING, key
    data, pos, items = parsed.data, array.start, []
    for _ in range(array.count):
        (length,) = struct.unpack_from("<Q", data, pos)
        items.append(bytes(data[pos + 8:pos + 8 + length]))
        pos += 8 + length
    return items


def _pair(key: str, value: Value) -> bytes:
    kind, payload = value
    return _string(key.encode()) + struct.pack("<I", kind) + payload


def craft(source: Path, dest: Path, changes: dict[str, Value | None] | None = None, *,
          first: dict[str, Value] | None = None, cut: int = 0) -> Path:
    """Write ``source`` to ``dest`` with ``changes`` (key -> new value, or None to drop it); ``first``
    adds pairs before all others (their keys may repeat or shadow existing ones); ``cut`` leaves out
    the file's last bytes."""
    changes, first = dict(changes or {}), first or {}
    parsed = header(source)
    data = parsed.data
    pairs = [_pair(key, value) for key, value in first.items()]
    for key, (start, end) in parsed.spans.items():
        if key not in changes:
            pairs.append(bytes(data[start:end]))
        elif changes[key] is not None:
            pairs.append(_pair(key, changes[key]))  # type: ignore[arg-type]
    pairs += [_pair(key, value) for key, value in changes.items() if key not in parsed.spans and value is not None]
    alignment = parsed.values.get("general.alignment", _reader.GGUF_DEFAULT_ALIGNMENT)
    start, end = parsed.tensors_span
    source_data = end + (-end % alignment)
    out = bytearray(b"GGUF" + struct.pack("<IQQ", parsed.version, len(parsed.tensors), len(pairs)))
    out += b"".join(pairs) + data[start:end]
    out += b"\0" * (-len(out) % alignment)
    with open(source, "rb") as src, open(dest, "wb") as dst:
        dst.write(out)
        src.seek(source_data)
        shutil.copyfileobj(src, dst, 1 << 22)
        if cut:
            dst.truncate(dst.tell() - cut)
    return dest


__all__ = ["ARRAY", "FLOAT32", "INT32", "STRING", "UINT32", "UINT64", "craft", "f32", "header", "nested_arrays",
           "numbers", "read_strings", "string", "strings", "u32"]
