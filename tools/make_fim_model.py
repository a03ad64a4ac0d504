"""Write a copy of SmolLM2's GGUF whose metadata names fill-in-the-middle (FIM) tokens.

    python tools/make_fim_model.py OUT.gguf [SOURCE.gguf]

Why: infill (``Context.infill``, llama-server's ``/infill``) needs a model whose vocabulary has FIM
tokens, and no small model in the cache has them. SmolLM2's tokenizer has no ``<fim_prefix>``-style
tokens (llama.cpp detects none from their text; it only takes ``<reponame>`` as the repo token), so
this names existing, otherwise unused control tokens of its vocabulary as the FIM roles, under the
keys llama.cpp reads (``tokenizer.ggml.fim_*_token_id``, src/llama-arch.cpp at our pin). The tensor
data is copied unchanged: the model generates as SmolLM2 does, and infill on it is a real test of
the prompt layout, compared with llama-server ``/infill`` on the same file (as upstream's tests
craft their models).
"""

from __future__ import annotations

import glob
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from crafted_gguf import UINT32, craft, read_strings  # tests/ holds the GGUF writer

# FIM role -> the SmolLM2 token (by its text) that plays it.
FIM_TOKENS = {
    "pre": "<issue_start>",
    "suf": "<issue_comment>",
    "mid": "<issue_closed>",
    "pad": "<empty_output>",
    "rep": "<repo_name>",
    "sep": "<file_sep>",
}


def default_source() -> Path:
    """SmolLM2-135M in mullama's model cache."""
    from mullama._paths import models_dir

    found = sorted(glob.glob(str(models_dir() / "smollm2-135m" / "*.gguf")))
    if not found:
        raise SystemExit("SmolLM2-135M is not in the cache: run `mullama pull smollm2-135m` first.")
    return Path(found[0])


def make_fim_model(out: Path, source: Path | None = None) -> dict[str, int]:
    """Write ``source`` (SmolLM2) to ``out`` with FIM token ids in its metadata; return role -> id."""
    source = source or default_source()
    vocab = read_strings(source, "tokenizer.ggml.tokens")
    ids: dict[str, int] = {}
    for role, text in FIM_TOKENS.items():
        try:
            ids[role] = vocab.index(text.encode())
        except ValueError:
            raise SystemExit(f"{source} has no token {text!r}: is it SmolLM2?") from None
    craft(source, out, {f"tokenizer.ggml.fim_{role}_token_id": (UINT32, struct.pack("<I", token))
                        for role, token in ids.items()})
    return ids


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 2):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    ids = make_fim_model(Path(argv[0]), Path(argv[1]) if len(argv) == 2 else None)
    print(f"wrote {argv[0]}: " + ", ".join(f"fim_{role}={token}" for role, token in ids.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
