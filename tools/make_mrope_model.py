"""Write SmolLM2 as a ``qwen2vl`` GGUF: a text model that llama.cpp runs with M-RoPE positions.

    python tools/make_mrope_model.py OUT.gguf [--for MODEL.gguf]

Why: images for Qwen2-VL-style models (``mtmd_decode_use_mrope``: an image of nx x ny embeddings is
decoded at 2-D positions and advances the text position by max(nx, ny), not by nx * ny) need a model
of an M-RoPE architecture, and no package ships a small one. SmolLM2 becomes one honestly: the
``llama.*`` keys are renamed ``qwen2vl.*``, ``qwen2vl.rope.dimension_sections`` is [8, 12, 12, 0] (its
64-dimension heads rotate 32 pairs), and the rows of each ``attn_q`` / ``attn_k`` weight are put back
in the order of the original checkpoint: llama's converter interleaves each head's rotary halves for
GGML's "normal" RoPE, while M-RoPE (like NeoX) rotates the first half of a head against the second.
A text token gets the same position in every section, so on text the model computes what SmolLM2
computes (the greedy answers agree up to rounding); the quantized blocks are moved whole (a row of
Q4_1 blocks is one row of the matrix), nothing is requantized. Written with the pinned tree's gguf-py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # not there under PYTHONSAFEPATH (the tests set it)
from _pinned_gguf import import_gguf  # a sibling module of this script
from make_lora import default_source  # SmolLM2 in the model cache

ARCH = "qwen2vl"
ROPE_SECTIONS = [8, 12, 12, 0]  # Qwen2-VL's [16, 24, 24, 0] scaled to SmolLM2's 32 rotated pairs


def _unpermute(rows: Any, n_head: int) -> Any:
    """The inverse of llama's converter's ``permute``: within each head, row 2j + k goes back to k * d/2 + j."""
    n_rows = rows.shape[0]
    head_dim = n_rows // n_head
    return (rows.reshape(n_head, head_dim // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape))


def make_mrope_model(out: Path, source: Path | None = None) -> dict[str, Any]:
    """Write ``source`` (a llama-architecture GGUF, SmolLM2 by default) as a qwen2vl GGUF to ``out``."""
    g: Any = import_gguf()
    source = source or default_source()
    reader = g.GGUFReader(str(source))
    arch = str(reader.fields["general.architecture"].contents())
    if arch != "llama":
        raise SystemExit(f"{source} is a {arch} model; this tool rewrites a llama-architecture one (SmolLM2).")
    n_head = int(reader.fields["llama.attention.head_count"].contents())
    n_head_kv = int(reader.fields["llama.attention.head_count_kv"].contents())
    writer = g.GGUFWriter(str(out), arch=ARCH)
    for field in reader.fields.values():
        if field.name in ("general.architecture", "general.name") or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == g.GGUFValueType.ARRAY else None
        name = ARCH + field.name[len("llama"):] if field.name.startswith("llama.") else field.name
        writer.add_key_value(name, field.contents(), kind, sub_type=sub_type)
    writer.add_key_value(f"{ARCH}.rope.dimension_sections", ROPE_SECTIONS, g.GGUFValueType.ARRAY,
                         sub_type=g.GGUFValueType.INT32)
    writer.add_key_value("general.name", f"{source.stem} as {ARCH} (M-RoPE)", g.GGUFValueType.STRING)
    moved = 0
    for tensor in reader.tensors:
        data = tensor.data
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            data = _unpermute(data, n_head if "attn_q" in tensor.name else n_head_kv)
            moved += 1
        writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": len(reader.tensors), "reordered": moved, "sections": ROPE_SECTIONS}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--for", dest="model", type=Path, default=None, help="the llama-architecture GGUF")
    args = parser.parse_args(argv)
    made = make_mrope_model(args.out, args.model)
    print(f"wrote {args.out}: {made['tensors']} tensors ({made['reordered']} q/k weights reordered), "
          f"{ARCH} with rope sections {made['sections']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
