"""Write a tiny random multimodal projector (an mmproj GGUF) that fits a text model (SmolLM2 by default):
a CLIP vision projector, with ``--audio`` a Whisper-style audio projector, with ``--kind qwen2vl`` a
Qwen2-VL one (M-RoPE positions), with ``--kind gemma3`` a Gemma 3 one (non-causal attention over the image).

    python tools/make_test_mmproj.py OUT.gguf [--for MODEL.gguf] [--seed 0] [--image-size 32] [--patch-size 8]
    python tools/make_test_mmproj.py OUT.gguf --audio [--for MODEL.gguf] [--seed 0]
    python tools/make_test_mmproj.py OUT.gguf --kind qwen2vl --for QWEN2VL.gguf [--patch-size 32]
    python tools/make_test_mmproj.py OUT.gguf --kind gemma3 --for GEMMA3.gguf [--image-size 64] [--patch-size 8]
    (any kind) [--encoder-width 64] [--encoder-heads 4] [--encoder-ff 128] [--encoder-blocks 2]

Why: images and audio in (``Model.load(..., mmproj=...)``, llama-server's ``--mmproj``) need a projector
for a model in the cache, and no package ships a small one; upstream's own tests make tiny ones the
same way.

The vision projector is what upstream's converter writes for a LLaVA-style model
(``clip.projector_type = mlp``): a ViT (``v.patch_embd``, ``v.position_embd``, ``v.blk.N.*``) over a
square image of ``--image-size`` pixels cut into ``--patch-size`` patches, then the two-layer MLP
``mm.0`` / ``mm.2`` whose output width is the text model's embedding size, so one image becomes
``(image_size / patch_size) ** 2`` embeddings the text model decodes (16 with the defaults).

The audio projector is what the converter writes for Qwen2-Audio (``clip.projector_type = qwen2a``),
the simplest audio projector of the pinned libmtmd: a Whisper encoder (two 1-D convolutions over a
128-bin log-mel spectrogram, the second of stride 2, ``a.conv1d.N``; ``a.position_embd``;
``a.blk.N.*`` with no key bias; ``a.post_ln``), an average pool of 2, then one linear layer
``mm.a.fc`` to the text model's width. libmtmd cuts audio into 30-second windows (silence-padded)
of 3000 mel frames, so each window becomes 750 embeddings.

The Qwen2-VL projector (``clip.projector_type = qwen2vl_merger``) is what the converter writes for
Qwen2-VL: two patch convolutions (``v.patch_embd.weight`` and ``.weight.1``, the two frames of a
still image), ViT blocks with 2-D M-RoPE and no learned positions, ``v.post_ln``, then the merger
``mm.0`` / ``mm.2`` over each 2 x 2 group of patches. The image keeps its aspect ratio (libmtmd
resizes it to multiples of two patches), so an image of nx x ny embeddings (nx * ny tokens) is
decoded by the text model at M-RoPE positions and takes max(nx, ny) positions: the text model must
be of an M-RoPE architecture (tools/make_mrope_model.py writes SmolLM2 as one). With the default
``--patch-size 32`` the pinned tree's 640 x 488 test image becomes 10 x 8 embeddings.

The Gemma 3 projector (``clip.projector_type = gemma3``) is a SigLIP ViT over a square image, an
average pool of ``clip.vision.projector.scale_factor`` (2 here: Gemma 3's own is 4) and the RMS-normed
projection ``mm.input_projection`` / ``mm.soft_emb_norm``; libmtmd asks for the image's embeddings
to be decoded with non-causal attention (``mtmd_decode_use_non_causal``). With the defaults of
``--image-size 64 --patch-size 8`` an image is 16 embeddings for Gemma 3 270M.

The weights are random (seeded; F32, the convolution kernels F16 as the converter writes them) and
scaled so that the embeddings are of the size of the text model's token embeddings: the model's
answers then depend on the image or the sound. The file is written with the pinned llama.cpp tree's
gguf-py (it needs numpy).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # not there under PYTHONSAFEPATH (the tests set it)
from _pinned_gguf import import_gguf, write_tensors_and_close  # a sibling module of this script
from make_lora import default_source  # SmolLM2 in the model cache


@dataclass(frozen=True)
class Encoder:
    """The transformer encoder's size: tiny by default (fast tests); a benchmark asks for a real one
    (CLIP ViT-B: ``Encoder(768, 12, 3072, 12)``)."""

    width: int = 64
    heads: int = 4
    ff: int = 128
    blocks: int = 2  # the MLP projector reads the last but one block's output: one block runs


# CLIP's normalisation (what LLaVA's converter records).
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
# Whisper's front end as Qwen2-Audio has it: 128 mel bins; 3000 frames (30 s) per window, halved by
# the stride-2 convolution (1500 positions), halved again by the pool after the blocks.
MEL_BINS = 128
AUDIO_POSITIONS = 1500
AUDIO_WINDOW_EMBEDDINGS = AUDIO_POSITIONS // 2
GEMMA3_POOL = 2  # patches per side averaged into one embedding (Gemma 3's own projector: 4)


def text_embedding_size(model: Path) -> int:
    """The text model's embedding width (``<arch>.embedding_length``), which the projector's output must match."""
    g: Any = import_gguf()
    reader = g.GGUFReader(str(model))
    arch = str(reader.fields["general.architecture"].contents())
    return int(reader.fields[f"{arch}.embedding_length"].contents())


class _Weights:
    """Seeded random tensors, scaled so that each layer keeps its input's size."""

    def __init__(self, seed: int, encoder: Encoder) -> None:
        import numpy as np

        self.np = np
        self.rng = np.random.default_rng(seed)
        self.encoder = encoder

    def dense(self, n_out: int, n_in: int, gain: float = 1.0) -> Any:
        return (self.rng.standard_normal((n_out, n_in)) * gain / self.np.sqrt(n_in)).astype(self.np.float32)

    def kernel(self, *shape: int, dtype: str = "float32") -> Any:
        """A convolution kernel in numpy order (out, in, ...): ggml's order reversed."""
        fan_in = int(self.np.prod(shape[1:]))
        return (self.rng.standard_normal(shape) / self.np.sqrt(fan_in)).astype(dtype)

    def normal(self, *shape: int, scale: float) -> Any:
        return (self.rng.standard_normal(shape) * scale).astype(self.np.float32)

    def zeros(self, *shape: int) -> Any:
        return self.np.zeros(shape, dtype=self.np.float32)

    def ones(self, *shape: int) -> Any:
        return self.np.ones(shape, dtype=self.np.float32)

    def encoder_blocks(self, prefix: str, key_bias: bool) -> dict[str, Any]:
        """The transformer blocks ``<prefix>.blk.N.*`` that clip.cpp's ``build_vit`` runs (Whisper's
        attention has no key bias, which its graph asserts)."""
        width, ff, tensors = self.encoder.width, self.encoder.ff, {}
        for block in range(self.encoder.blocks):
            at = f"{prefix}.blk.{block}"
            for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
                tensors[f"{at}.{name}.weight"] = self.dense(width, width)
                if key_bias or name != "attn_k":
                    tensors[f"{at}.{name}.bias"] = self.zeros(width)
            for norm in ("ln1", "ln2"):
                tensors[f"{at}.{norm}.weight"] = self.ones(width)
                tensors[f"{at}.{norm}.bias"] = self.zeros(width)
            tensors[f"{at}.ffn_up.weight"] = self.dense(ff, width)
            tensors[f"{at}.ffn_up.bias"] = self.zeros(ff)
            tensors[f"{at}.ffn_down.weight"] = self.dense(width, ff)
            tensors[f"{at}.ffn_down.bias"] = self.zeros(width)
        return tensors


def _encoder_keys(writer: Any, modality: str, n_embd_text: int, encoder: Encoder) -> None:
    """The ``clip.<modality>.*`` sizes of the encoder every projector here has."""
    writer.add_uint32(f"clip.{modality}.embedding_length", encoder.width)
    writer.add_uint32(f"clip.{modality}.feed_forward_length", encoder.ff)
    writer.add_uint32(f"clip.{modality}.block_count", encoder.blocks)
    writer.add_uint32(f"clip.{modality}.projection_dim", n_embd_text)
    writer.add_uint32(f"clip.{modality}.attention.head_count", encoder.heads)
    writer.add_float32(f"clip.{modality}.attention.layer_norm_epsilon", 1e-5)


def _vision_keys(writer: Any, weights: _Weights, n_embd_text: int, projector_type: str, image_size: int,
                 patch_size: int, *, gelu: bool, scale_factor: int | None = None,
                 mean_std: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGE_MEAN, IMAGE_STD)) -> None:
    """The keys every vision projector here writes, in the converter's order."""
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_audio_encoder", False)
    writer.add_string("clip.projector_type", projector_type)
    if gelu:
        writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", image_size)
    writer.add_uint32("clip.vision.patch_size", patch_size)
    if scale_factor is not None:
        writer.add_uint32("clip.vision.projector.scale_factor", scale_factor)
    _encoder_keys(writer, "vision", n_embd_text, weights.encoder)
    writer.add_array("clip.vision.image_mean", list(mean_std[0]))
    writer.add_array("clip.vision.image_std", list(mean_std[1]))


def _vision(writer: Any, weights: _Weights, n_embd_text: int, image_size: int, patch_size: int) -> dict[str, Any]:
    """A LLaVA-style vision projector's keys (written) and tensors (returned)."""
    if image_size % patch_size:
        raise SystemExit(f"--image-size {image_size} is not a multiple of --patch-size {patch_size}")
    width = weights.encoder.width
    n_patches = (image_size // patch_size) ** 2
    tensors: dict[str, Any] = {
        # ggml's conv2d kernel [patch, patch, 3, width]: numpy order reversed
        "v.patch_embd.weight": weights.kernel(width, 3, patch_size, patch_size),
        "v.patch_embd.bias": weights.zeros(width),
        "v.position_embd.weight": weights.normal(n_patches, width, scale=0.1),
        "v.pre_ln.weight": weights.ones(width),
        "v.pre_ln.bias": weights.zeros(width),
        **weights.encoder_blocks("v", key_bias=True),
        # The projector: the text model's token embeddings have a standard deviation of a few hundredths.
        "mm.0.weight": weights.dense(n_embd_text, width),
        "mm.0.bias": weights.zeros(n_embd_text),
        "mm.2.weight": weights.dense(n_embd_text, n_embd_text, gain=0.1),
        "mm.2.bias": weights.zeros(n_embd_text),
    }
    _vision_keys(writer, weights, n_embd_text, "mlp", image_size, patch_size, gelu=True)
    return tensors


def _audio(writer: Any, weights: _Weights, n_embd_text: int) -> dict[str, Any]:
    """A Qwen2-Audio-style (Whisper encoder) audio projector's keys (written) and tensors (returned)."""
    width = weights.encoder.width
    tensors: dict[str, Any] = {
        # ggml's conv1d kernels [3, in, out], F16 as the converter writes them; biases [1, out]
        "a.conv1d.1.weight": weights.kernel(width, MEL_BINS, 3, dtype="float16"),
        "a.conv1d.1.bias": weights.zeros(width, 1),
        "a.conv1d.2.weight": weights.kernel(width, width, 3, dtype="float16"),
        "a.conv1d.2.bias": weights.zeros(width, 1),
        # Small beside the convolutions' output, so that what differs between clips is the sound.
        "a.position_embd.weight": weights.normal(AUDIO_POSITIONS, width, scale=0.1),
        **weights.encoder_blocks("a", key_bias=False),
        "a.post_ln.weight": weights.ones(width),
        "a.post_ln.bias": weights.zeros(width),
        # The projector's input is layer-normed: a gain of a few hundredths gives embeddings of the
        # text model's token embeddings' size.
        "mm.a.fc.weight": weights.dense(n_embd_text, width, gain=0.05),
        "mm.a.fc.bias": weights.zeros(n_embd_text),
    }
    writer.add_bool("clip.has_vision_encoder", False)
    writer.add_bool("clip.has_audio_encoder", True)
    writer.add_string("clip.projector_type", "qwen2a")
    _encoder_keys(writer, "audio", n_embd_text, weights.encoder)
    writer.add_uint32("clip.audio.num_mel_bins", MEL_BINS)
    return tensors


def _qwen2vl(writer: Any, weights: _Weights, n_embd_text: int, image_size: int, patch_size: int) -> dict[str, Any]:
    """A Qwen2-VL projector's keys (written) and tensors (returned)."""
    width, merged = weights.encoder.width, 4 * weights.encoder.width  # the merger reads 2 x 2 patches at once
    tensors: dict[str, Any] = {
        # Qwen2-VL's 3-D patch convolution as the converter splits it: one 2-D kernel per frame, no bias.
        "v.patch_embd.weight": weights.kernel(width, 3, patch_size, patch_size),
        "v.patch_embd.weight.1": weights.kernel(width, 3, patch_size, patch_size),
        **weights.encoder_blocks("v", key_bias=True),
        "v.post_ln.weight": weights.ones(width),
        "v.post_ln.bias": weights.zeros(width),
        "mm.0.weight": weights.dense(merged, merged),
        "mm.0.bias": weights.zeros(merged),
        "mm.2.weight": weights.dense(n_embd_text, merged, gain=0.1),
        "mm.2.bias": weights.zeros(n_embd_text),
    }
    _vision_keys(writer, weights, n_embd_text, "qwen2vl_merger", image_size, patch_size, gelu=False)
    return tensors


def _gemma3(writer: Any, weights: _Weights, n_embd_text: int, image_size: int, patch_size: int) -> dict[str, Any]:
    """A Gemma 3 (SigLIP) projector's keys (written) and tensors (returned)."""
    if image_size % (patch_size * GEMMA3_POOL):
        raise SystemExit(f"--image-size {image_size} is not a multiple of {GEMMA3_POOL} patches of {patch_size}")
    width = weights.encoder.width
    n_patches = (image_size // patch_size) ** 2
    tensors: dict[str, Any] = {
        "v.patch_embd.weight": weights.kernel(width, 3, patch_size, patch_size),
        "v.patch_embd.bias": weights.zeros(width),
        "v.position_embd.weight": weights.normal(n_patches, width, scale=0.1),
        **weights.encoder_blocks("v", key_bias=True),
        "v.post_ln.weight": weights.ones(width),
        "v.post_ln.bias": weights.zeros(width),
        # RMS-normed pooled patches (entries of about 1) times this: entries of about 16, large enough beside
        # Gemma's scaled token embeddings that its answers depend on the image (at 1 they do not).
        # In numpy order [width, n_embd_text]: ggml transposes it before the product.
        "mm.soft_emb_norm.weight": weights.ones(width),
        "mm.input_projection.weight": weights.normal(width, n_embd_text, scale=16.0 / width ** 0.5),
    }
    _vision_keys(writer, weights, n_embd_text, "gemma3", image_size, patch_size, gelu=True,
                 scale_factor=GEMMA3_POOL, mean_std=((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    return tensors


KINDS = {"mlp": "LLaVA-style", "audio": "Qwen2-Audio-style audio", "qwen2vl": "Qwen2-VL (M-RoPE)",
         "gemma3": "Gemma 3 (non-causal)"}


def make_mmproj(out: Path, model: Path | None = None, *, seed: int = 0, image_size: int | None = None,
                patch_size: int | None = None, audio: bool = False, kind: str = "mlp",
                encoder: Encoder = Encoder()) -> dict[str, Any]:
    """Write a random projector for ``model`` to ``out``: a LLaVA-style vision one, a Qwen2-Audio-style
    audio one when ``audio`` (or ``kind="audio"``), a Qwen2-VL or Gemma 3 one by ``kind``; return what
    it is (its output width, the embeddings per image or per 30-second audio window (for Qwen2-VL,
    per 64 x 64 patch square: it depends on the image), its tensor count)."""
    g: Any = import_gguf()
    kind = "audio" if audio else kind
    if kind not in KINDS:
        raise SystemExit(f"--kind must be one of {', '.join(KINDS)}, not {kind!r}")
    model = model or default_source()
    n_embd_text = text_embedding_size(model)
    weights = _Weights(seed, encoder)
    sizes = {"qwen2vl": (448, 32), "gemma3": (64, 8)}.get(kind, (32, 8))
    image_size, patch_size = image_size or sizes[0], patch_size or sizes[1]
    writer = g.GGUFWriter(str(out), arch="clip")
    writer.add_string("general.name", f"random {KINDS[kind]} projector seed {seed} for {model.name}")
    writer.add_uint32("general.file_type", 1 if kind == "audio" else 0)  # F32, the audio one's kernels F16
    if kind == "audio":
        tensors = _audio(writer, weights, n_embd_text)
        per_item = AUDIO_WINDOW_EMBEDDINGS
    elif kind == "qwen2vl":
        tensors = _qwen2vl(writer, weights, n_embd_text, image_size, patch_size)
        per_item = (64 // patch_size // 2) ** 2
    elif kind == "gemma3":
        tensors = _gemma3(writer, weights, n_embd_text, image_size, patch_size)
        per_item = (image_size // patch_size // GEMMA3_POOL) ** 2
    else:
        tensors = _vision(writer, weights, n_embd_text, image_size, patch_size)
        per_item = (image_size // patch_size) ** 2
    write_tensors_and_close(writer, tensors)
    return {"n_embd": n_embd_text, "tokens_per_item": per_item, "tensors": len(tensors), "kind": KINDS[kind]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--for", dest="model", type=Path, default=None, help="the text model's GGUF")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--audio", action="store_true", help="an audio projector (Whisper encoder, qwen2a) "
                        "instead of a vision one")
    parser.add_argument("--kind", choices=sorted(KINDS), default="mlp", help="the projector's type (default mlp: "
                        "LLaVA-style; qwen2vl: M-RoPE; gemma3: non-causal)")
    parser.add_argument("--image-size", type=int, default=None, help="the square the image is resized to (pixels; "
                        "default 32, gemma3 64; qwen2vl keeps the image's own size)")
    parser.add_argument("--patch-size", type=int, default=None, help="pixels per patch side (default 8, qwen2vl 32)")
    default = Encoder()
    parser.add_argument("--encoder-width", type=int, default=default.width, help="the encoder's width "
                        f"(default {default.width}; a real CLIP ViT-B: 768)")
    parser.add_argument("--encoder-heads", type=int, default=default.heads, help=f"(default {default.heads}; 12)")
    parser.add_argument("--encoder-ff", type=int, default=default.ff, help=f"its feed-forward width (default "
                        f"{default.ff}; 3072)")
    parser.add_argument("--encoder-blocks", type=int, default=default.blocks, help=f"(default {default.blocks}; 12)")
    args = parser.parse_args(argv)
    if args.encoder_width % args.encoder_heads:
        raise SystemExit(f"--encoder-width {args.encoder_width} is not a multiple of --encoder-heads "
                         f"{args.encoder_heads}")
    encoder = Encoder(args.encoder_width, args.encoder_heads, args.encoder_ff, args.encoder_blocks)
    made = make_mmproj(args.out, args.model, seed=args.seed, image_size=args.image_size, patch_size=args.patch_size,
                       audio=args.audio, kind=args.kind, encoder=encoder)
    item = "30-second audio window" if args.audio or args.kind == "audio" else \
        "64 x 64 pixels" if args.kind == "qwen2vl" else "image"
    print(f"wrote {args.out}: a {made['kind']} projector, {made['tensors']} tensors, {made['tokens_per_item']} "
          f"embeddings of {made['n_embd']} per {item}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
