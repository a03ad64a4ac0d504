"""Write a copy of the all-MiniLM-L6-v2 GGUF with a reranking (classification) head.

    python tools/make_rank_model.py OUT.gguf [SOURCE.gguf]

Why: reranking (``Model.rerank``, llama-server's ``--rerank`` and ``/v1/rerank``) needs a GGUF whose
graph ends in rank pooling, and no small model in the cache has one. As upstream's tests craft their
models, this adds to all-MiniLM (a BERT encoder) the head llama.cpp's BERT graph reads for
``LLAMA_POOLING_TYPE_RANK`` (src/models/bert.cpp and build_pooling in src/llama-graph.cpp at our
pin): ``cls.weight`` (n_embd x n_embd) and ``cls.bias`` (the dense layer, then tanh), and
``cls.output.weight`` (n_embd x 1) and ``cls.output.bias`` (one score), filled with small
deterministic random values (a fixed seed), and sets ``bert.pooling_type`` to 4 (RANK in
``enum llama_pooling_type``). The encoder's tensors are copied unchanged, so the scores are real
(if meaningless) outputs of the real graph, comparable with llama-server's on the same file. The
file is written with the pinned llama.cpp tree's gguf-py (it needs numpy).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # not there under PYTHONSAFEPATH (the tests set it)
from _pinned_gguf import import_gguf  # a sibling module of this script

SEED = 20240527
POOLING_RANK = 4  # LLAMA_POOLING_TYPE_RANK in llama.h


def default_source() -> Path:
    """all-MiniLM-L6-v2 from mullama's model cache (pulled, verified, on first use)."""
    from mullama.hub._pull import resolve

    return resolve("all-minilm:l6-v2", quiet=True)


def make_rank_model(out: Path, source: Path | None = None, seed: int = SEED) -> dict[str, tuple[int, ...]]:
    """Write ``source`` (all-MiniLM) to ``out`` with rank pooling and a classification head;
    return the added tensors' names and shapes (numpy order)."""
    import numpy as np

    g: Any = import_gguf()
    source = source or default_source()
    reader = g.GGUFReader(str(source))
    arch = str(reader.fields["general.architecture"].contents())
    if arch != "bert":
        raise SystemExit(f"{source} is a {arch!r} model; this tool adds a BERT classification head.")
    n_embd = int(reader.fields[f"{arch}.embedding_length"].contents())
    rng = np.random.default_rng(seed)
    scale = 1.0 / np.sqrt(n_embd)
    head = {
        "cls.weight": (rng.standard_normal((n_embd, n_embd)) * scale).astype(np.float32),
        "cls.bias": (rng.standard_normal(n_embd) * 0.1).astype(np.float32),
        "cls.output.weight": (rng.standard_normal((1, n_embd)) * 2 * scale).astype(np.float32),
        "cls.output.bias": np.array([0.05], dtype=np.float32),
    }
    pooling_key = f"{arch}.pooling_type"
    writer = g.GGUFWriter(str(out), arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == g.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name == pooling_key:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == g.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_key_value(pooling_key, POOLING_RANK, g.GGUFValueType.UINT32)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    for name, data in head.items():
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, g.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    for data in head.values():
        writer.write_tensor_data(data)
    writer.close()
    return {name: tuple(data.shape) for name, data in head.items()}


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    added = make_rank_model(Path(argv[0]), Path(argv[1]) if len(argv) == 2 else None)
    print(f"wrote {argv[0]}: pooling rank, " + ", ".join(f"{name} {shape}" for name, shape in added.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
