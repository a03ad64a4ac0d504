"""Write a tiny random CLIP vision projector (an mmproj GGUF) that fits a text model (SmolLM2 by default).

    python tools/make_test_mmproj.py OUT.gguf [--for MODEL.gguf] [--seed 0] [--image-size 32] [--patch-size 8]

Why: images in (``Model.load(..., mmproj=...)``, llama-server's ``--mmproj``) need a vision projector
for a model in the cache, and no package ships a small one; upstream's own tests make tiny ones
the same way. This writes what upstream's converter writes for a LLaVA-style model
(``clip.projector_type = mlp``): a ViT (``v.patch_embd``, ``v.position_embd``, ``v.blk.N.*``) over a
square image of ``--image-size`` pixels cut into ``--patch-size`` patches, then the two-layer MLP
``mm.0`` / ``mm.2`` whose output width is the text model's embedding size, so one image becomes
``(image_size / patch_size) ** 2`` embeddings the text model decodes (16 with the defaults).
The weights are random (seeded, F32) and scaled so that image embeddings are of the size of the text
model's token embeddings: the model's answers then depend on the image. The file is written with the
pinned llama.cpp tree's gguf-py (it needs numpy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # not there under PYTHONSAFEPATH (the tests set it)
from _pinned_gguf import import_gguf, write_tensors_and_close  # a sibling module of this script
from make_lora import default_source  # SmolLM2 in the model cache

VISION_WIDTH = 64
VISION_HEADS = 4
VISION_FF = 128
VISION_BLOCKS = 2  # the MLP projector reads the last but one block's output: one block runs
# CLIP's normalisation (what LLaVA's converter records).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def text_embedding_size(model: Path) -> int:
    """The text model's embedding width (``<arch>.embedding_length``), which the projector's output must match."""
    g: Any = import_gguf()
    reader = g.GGUFReader(str(model))
    arch = str(reader.fields["general.architecture"].contents())
    return int(reader.fields[f"{arch}.embedding_length"].contents())


def make_mmproj(out: Path, model: Path | None = None, *, seed: int = 0, image_size: int = 32,
                patch_size: int = 8) -> dict[str, Any]:
    """Write a random LLaVA-style vision projector for ``model`` to ``out``; return what it is
    (its output width and the number of embeddings per image)."""
    import numpy as np

    if image_size % patch_size:
        raise SystemExit(f"--image-size {image_size} is not a multiple of --patch-size {patch_size}")
    g: Any = import_gguf()
    model = model or default_source()
    n_embd_text = text_embedding_size(model)
    n_patches = (image_size // patch_size) ** 2
    rng = np.random.default_rng(seed)

    def dense(n_out: int, n_in: int, gain: float = 1.0) -> Any:
        return (rng.standard_normal((n_out, n_in)) * gain / np.sqrt(n_in)).astype(np.float32)

    def zeros(*shape: int) -> Any:
        return np.zeros(shape, dtype=np.float32)

    def ones(*shape: int) -> Any:
        return np.ones(shape, dtype=np.float32)

    width = VISION_WIDTH
    tensors: dict[str, Any] = {
        # ggml's conv2d kernel [patch, patch, 3, width]: numpy order reversed
        "v.patch_embd.weight": (rng.standard_normal((width, 3, patch_size, patch_size))
                                / np.sqrt(3 * patch_size * patch_size)).astype(np.float32),
        "v.patch_embd.bias": zeros(width),
        "v.position_embd.weight": (rng.standard_normal((n_patches, width)) * 0.1).astype(np.float32),
        "v.pre_ln.weight": ones(width),
        "v.pre_ln.bias": zeros(width),
    }
    for block in range(VISION_BLOCKS):
        prefix = f"v.blk.{block}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"{prefix}.{name}.weight"] = dense(width, width)
            tensors[f"{prefix}.{name}.bias"] = zeros(width)
        for norm in ("ln1", "ln2"):
            tensors[f"{prefix}.{norm}.weight"] = ones(width)
            tensors[f"{prefix}.{norm}.bias"] = zeros(width)
        tensors[f"{prefix}.ffn_up.weight"] = dense(VISION_FF, width)
        tensors[f"{prefix}.ffn_up.bias"] = zeros(VISION_FF)
        tensors[f"{prefix}.ffn_down.weight"] = dense(width, VISION_FF)
        tensors[f"{prefix}.ffn_down.bias"] = zeros(width)
    # The projector: the text model's token embeddings have a standard deviation of a few hundredths.
    tensors["mm.0.weight"] = dense(n_embd_text, width)
    tensors["mm.0.bias"] = zeros(n_embd_text)
    tensors["mm.2.weight"] = dense(n_embd_text, n_embd_text, gain=0.1)
    tensors["mm.2.bias"] = zeros(n_embd_text)

    writer = g.GGUFWriter(str(out), arch="clip")
    writer.add_string("general.name", f"random LLaVA-style projector seed {seed} for {model.name}")
    writer.add_uint32("general.file_type", 0)  # all F32
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_audio_encoder", False)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", image_size)
    writer.add_uint32("clip.vision.patch_size", patch_size)
    writer.add_uint32("clip.vision.embedding_length", width)
    writer.add_uint32("clip.vision.feed_forward_length", VISION_FF)
    writer.add_uint32("clip.vision.block_count", VISION_BLOCKS)
    writer.add_uint32("clip.vision.projection_dim", n_embd_text)
    writer.add_uint32("clip.vision.attention.head_count", VISION_HEADS)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", list(IMAGE_MEAN))
    writer.add_array("clip.vision.image_std", list(IMAGE_STD))
    write_tensors_and_close(writer, tensors)
    return {"n_embd": n_embd_text, "tokens_per_image": n_patches, "tensors": len(tensors)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--for", dest="model", type=Path, default=None, help="the text model's GGUF")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32, help="the square the image is resized to (pixels)")
    parser.add_argument("--patch-size", type=int, default=8, help="pixels per patch side (one embedding each)")
    args = parser.parse_args(argv)
    made = make_mmproj(args.out, args.model, seed=args.seed, image_size=args.image_size, patch_size=args.patch_size)
    print(f"wrote {args.out}: {made['tensors']} tensors, {made['tokens_per_image']} embeddings of "
          f"{made['n_embd']} per image")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
