#!/usr/bin/env python3
"""Decode speed with a JSON schema and with logprobs, mullama vs llama-server, in one run.

For each setting (plain, ``json_schema``, ``logprobs=5``) both generate up to ``--tokens``
tokens greedily from the same chat prompt (the same tokens: greedy parity); mullama's rate is the
stream's ``tokens_per_second()``, llama-server's its own ``timings.predicted_per_second``
(decode time only, no HTTP). Rounds are interleaved; medians of ``--reps``. Prints each
setting's ratio to llama-server's same setting, and to its own plain rate.

    python benchmarks/bench_structured.py [--tokens 128] [--reps 3] [--json FILE]
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

import bench_server  # noqa: F401  (puts tests/ on sys.path for upstream)
import upstream

import mullama
from mullama.generate._context import default_threads
from mullama.hub import _catalog, _pull

SCHEMA = {"type": "object", "properties": {
    "items": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string"}, "count": {"type": "integer"}}, "required": ["name", "count"]}}},
    "required": ["items"]}
SETTINGS = {"plain": ({}, {}), "json_schema": ({"json_schema": SCHEMA}, {"json_schema": SCHEMA}),
            "logprobs=5": ({"logprobs": 5}, {"n_probs": 5})}


def ours(context: mullama.Context, prompt: str, tokens: int, options: dict) -> float:
    stream = context.generate_stream(prompt, max_tokens=tokens, temperature=0, timeout_ms=None, **options)
    for _ in stream:
        pass
    return stream.tokens_per_second()


def theirs(server: upstream.LlamaServer, prompt: str, tokens: int, options: dict) -> float:
    body = {"prompt": prompt, "n_predict": tokens, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
            "samplers": ["top_k", "temperature"], **options}
    return float(server.post("/completion", body)["timings"]["predicted_per_second"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    build = upstream.build_with_tools()
    model_path = _pull.resolve(_catalog.DEFAULT_MODEL)
    model = mullama.Model.load(model_path)
    context = mullama.Context(model, n_ctx=2048, n_threads=args.threads)
    prompt = model.apply_chat_template([{"role": "user", "content": "List the fruit in my basket as JSON."}])
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=args.threads, n_ctx=2048)
    rates: dict[str, dict[str, list[float]]] = {name: {"mullama": [], "llama-server": []} for name in SETTINGS}
    try:
        for mine, peer in SETTINGS.values():  # warm-up
            ours(context, prompt, 8, mine)
            theirs(server, prompt, 8, peer)
        for _ in range(args.reps):
            for name, (mine, peer) in SETTINGS.items():
                time.sleep(0.5)
                rates[name]["mullama"].append(ours(context, prompt, args.tokens, mine))
                time.sleep(0.5)
                rates[name]["llama-server"].append(theirs(server, prompt, args.tokens, peer))
    finally:
        server.close()
        context.close()
    figures = {name: {who: statistics.median(values) for who, values in pair.items()} for name, pair in rates.items()}
    print(f"model {model_path.name}, {args.threads} threads, {args.tokens} tokens, medians of {args.reps}\n")
    print("| setting | mullama tok/s | llama-server tok/s | ratio | mullama vs its plain |")
    print("| --- | ---: | ---: | ---: | ---: |")
    plain = figures["plain"]["mullama"]
    for name, row in figures.items():
        print(f"| {name} | {row['mullama']:.1f} | {row['llama-server']:.1f} | "
              f"{row['mullama'] / row['llama-server']:.3f} | {row['mullama'] / plain:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": args.tokens, "threads": args.threads, **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
