"""Write a draft model for speculative decoding: SmolLM2 requantised smaller, with llama_model_quantize.

    python tools/make_draft_model.py OUT.gguf [--for MODEL.gguf] [--type q4_0|q2_k|q3_k_s|...] [--threads N]

Why: ``Context(model, draft_model=...)`` (llama-server's ``-md``) needs a model with the same
vocabulary as the target, and none of the catalog's is. Requantising the target itself gives one:
the same tokenizer, the same architecture, smaller weights (llama.cpp's ``llama_model_quantize`` with
``allow_requantize``, through mullama's own bindings, as upstream's ``llama-quantize
--allow-requantize`` does). Its drafts are mostly the target's own next tokens, so it exercises the
draft-model path end to end; a real speed-up needs a draft model several times smaller than the target.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FTYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7, "q2_k": 10, "q3_k_s": 11, "q4_k_s": 14}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the GGUF to write")
    parser.add_argument("--for", dest="source", help="the model to requantise (default: the cached SmolLM2)")
    parser.add_argument("--type", default="q2_k", choices=sorted(FTYPES), help="the quantisation (default q2_k)")
    parser.add_argument("--threads", type=int, default=0, help="threads (default: all)")
    args = parser.parse_args(argv)

    from mullama.hub import _catalog, _pull
    from mullama.native import _library

    source = Path(args.source) if args.source else _pull.resolve(_catalog.DEFAULT_MODEL)
    library = _library.get()
    lib, ffi = library.lib, library.ffi
    params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.ftype = FTYPES[args.type]
    params.nthread = args.threads
    params.allow_requantize = True
    rc = lib.llama_model_quantize(str(source).encode(), str(args.out).encode(), params)
    if rc != 0:
        print(f"make_draft_model: llama_model_quantize failed ({rc}) for {source}", file=sys.stderr)
        return 1
    print(f"{args.out}: {source.name} requantised to {args.type} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
