#!/usr/bin/env python3
"""Scoring prompts (evals' loglikelihoods): ours beside our plain prompt decode and llama-cpp-python's echo.

lm-eval's multiple-choice tasks ask a server for each prompt token's log-probability given those before it
(``echo`` with ``logprobs`` on ``/v1/completions``; llama-server refuses it). This times ours in Python
(``StreamConfig(prompt_logprobs=1)``, the prompt decoded whole with every row's logits kept, then the
log-softmax of each row) against our plain decode of the same prompt (``cache_prompt=False``: the last
row's logits only), and, given an interpreter with llama-cpp-python (``--llama-cpp-python PYTHON``), its
``create_completion(echo=True, logprobs=1)`` on a ``Llama(logits_all=True)`` in a process of its own
(benchmarks/llama_cpp_python_peer.py), with the largest difference between the two scores. Prompts are
a passage's first 64 to 1024 tokens; each figure is the median over ``--reps`` runs.

    python benchmarks/bench_scoring.py [--model smollm2:135m] [--reps 3] [--llama-cpp-python PYTHON] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_speculative import PASSAGE
from llama_cpp_python_peer import run_peer

import mullama
from mullama import StreamConfig
from mullama.generate._context import default_threads
from mullama.hub import _pull

LENGTHS = (64, 256, 512, 1024)


def _timed(context: mullama.Context, tokens: list[int], config: StreamConfig) -> tuple[float, list]:
    start = time.perf_counter()
    stream = context._stream(tokens, config=config)
    with stream:
        for _ in stream:
            pass
    return time.perf_counter() - start, stream.prompt_logprobs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--llama-cpp-python", metavar="PYTHON", help="an interpreter with llama-cpp-python installed")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    path = _pull.resolve(args.model)
    model = mullama.Model.load(path)
    whole = model.tokenize(" ".join([PASSAGE] * 4), add_special=False)
    # as text: llama-cpp-python's echo takes no token ids (0.3.36: "can only concatenate list")
    texts = {f"{n} tokens": model.detokenize(whole[:n]) for n in LENGTHS}
    prompts = {name: model.tokenize(text) for name, text in texts.items()}
    figures: dict[str, dict] = {}
    with mullama.Context(model, n_ctx=2048, n_threads=args.threads) as context:
        for name, tokens in prompts.items():
            plain, scored, logprobs = [], [], []
            for _ in range(args.reps):
                plain.append(_timed(context, tokens, StreamConfig(max_tokens=1, temperature=0, cache_prompt=False))[0])
                seconds, logprobs = _timed(context, tokens,
                                           StreamConfig(max_tokens=1, temperature=0, prompt_logprobs=1))
                scored.append(seconds)
            figures[name] = {"tokens": len(tokens), "plain_seconds": statistics.median(plain),
                             "scored_seconds": statistics.median(scored),
                             "token_logprobs": [token.logprob for token in logprobs]}
    if args.llama_cpp_python:
        theirs = run_peer(args.llama_cpp_python, {"model": str(path), "threads": args.threads, "n_ctx": 2048,
                                                  "reps": args.reps, "score": texts})
        for name, result in theirs["score"].items():
            ours = figures[name].pop("token_logprobs")
            if len(result["token_logprobs"]) < len(ours):  # its own tokens of the text: as many, or not compared
                raise RuntimeError(f"{name}: llama-cpp-python scored {len(result['token_logprobs'])} tokens, "
                                   f"ours {len(ours)}")
            gaps = [abs(a - b) for a, b in zip(ours[1:], result["token_logprobs"][1:])]
            figures[name]["llama_cpp_python"] = {"seconds": result["seconds"], "max_difference": max(gaps),
                                                 "version": theirs["version"]}
    else:
        for result in figures.values():
            result.pop("token_logprobs")
    print("| prompt | plain decode tok/s | scored tok/s | scored / plain | llama-cpp-python echo tok/s "
          "| ours / theirs | largest logprob difference |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, result in figures.items():
        n, peer = result["tokens"], result.get("llama_cpp_python")
        ours = n / result["scored_seconds"]
        cells = [name, f"{n / result['plain_seconds']:.1f}", f"{ours:.1f}",
                 f"{result['plain_seconds'] / result['scored_seconds']:.2f}"]
        cells += ([f"{n / peer['seconds']:.1f}", f"{ours / (n / peer['seconds']):.2f}", f"{peer['max_difference']:.1e}"]
                  if peer else ["", "", ""])
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
