"""Write a small random LoRA adapter GGUF for a model (SmolLM2 by default).

    python tools/make_lora.py OUT.gguf [--for MODEL.gguf] [--rank 8] [--seed 0] [--strength 0.2]
                              [--targets attn_q,attn_v] [--alpha ALPHA]

Why: LoRA support (``Model.load(..., lora=...)``, llama-server's ``--lora``) needs an adapter for a
model in the cache, and no package ships one. This writes what upstream's convert_lora_to_gguf.py
writes for a PEFT adapter: ``general.type = adapter``, ``general.architecture`` of the base model,
``adapter.type = lora``, ``adapter.lora.alpha``, and for each target weight ``W`` (n_out x n_in) of
every block a pair ``<W>.lora_a`` (rank x n_in) and ``<W>.lora_b`` (n_out x rank), in F32, so that
llama.cpp adds ``scale * alpha / rank * B @ A`` to ``W``. The values are random (seeded) and large
enough (``--strength``, the standard deviation of B) that greedy output differs from the base model.
The file is written with the pinned llama.cpp tree's gguf-py (it needs numpy).
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # not there under PYTHONSAFEPATH (the tests set it)
from _pinned_gguf import import_gguf, write_tensors_and_close  # a sibling module of this script

DEFAULT_TARGETS = ("attn_q", "attn_v")


def default_source() -> Path:
    """SmolLM2-135M in mullama's model cache."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mullama._paths import models_dir

    found = sorted(glob.glob(str(models_dir() / "smollm2-135m" / "*.gguf")))
    if not found:
        raise SystemExit("SmolLM2-135M is not in the cache: run `mullama pull smollm2-135m` first.")
    return Path(found[0])


def make_lora(out: Path, source: Path | None = None, *, rank: int = 8, seed: int = 0, strength: float = 0.2,
              targets: tuple[str, ...] = DEFAULT_TARGETS, alpha: float | None = None) -> dict[str, tuple[int, ...]]:
    """Write a random LoRA adapter for ``source`` to ``out``; return its tensors' names and shapes
    (numpy order)."""
    import numpy as np

    g: Any = import_gguf()
    source = source or default_source()
    reader = g.GGUFReader(str(source))
    arch = str(reader.fields["general.architecture"].contents())
    rng = np.random.default_rng(seed)
    pairs: dict[str, Any] = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in targets or parts[3] != "weight":
            continue
        n_in, n_out = int(tensor.shape[0]), int(tensor.shape[1])  # ggml order: ne[0] is the input
        pairs[f"{tensor.name}.lora_a"] = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        pairs[f"{tensor.name}.lora_b"] = (rng.standard_normal((n_out, rank)) * strength).astype(np.float32)
    if not pairs:
        raise SystemExit(f"{source} has no blk.N.{{{','.join(targets)}}}.weight tensors to adapt.")
    writer = g.GGUFWriter(str(out), arch=arch)
    writer.add_type(g.GGUFType.ADAPTER)
    writer.add_string(g.Keys.Adapter.TYPE, "lora")
    writer.add_float32(g.Keys.Adapter.LORA_ALPHA, float(rank if alpha is None else alpha))
    writer.add_string(g.Keys.General.NAME, f"random LoRA r{rank} seed {seed} for {source.name}")
    write_tensors_and_close(writer, pairs)
    return {name: tuple(data.shape) for name, data in pairs.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--for", dest="model", type=Path, default=None, help="the base model's GGUF")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strength", type=float, default=0.2, help="standard deviation of lora_b")
    parser.add_argument("--alpha", type=float, default=None, help="adapter.lora.alpha (default: the rank)")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS), help="weights to adapt in every block")
    args = parser.parse_args(argv)
    tensors = make_lora(args.out, args.model, rank=args.rank, seed=args.seed, strength=args.strength,
                        targets=tuple(args.targets.split(",")), alpha=args.alpha)
    print(f"wrote {args.out}: {len(tensors)} tensors, rank {args.rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
