#!/usr/bin/env python3
"""N concurrent AsyncModel streams in one process vs one stream, and vs llama-server -np N.

For each N (default 1, 4, 8): N async streams of one ``AsyncModel(parallel=N)`` generate
``--tokens`` tokens each (greedy, ``ignore_eos``) at once, and N streaming clients ask
upstream llama-server started with ``-np N`` for the same. Rounds are interleaved so the
machine's drift affects both alike; each figure is the median over ``--reps`` rounds.
Prints aggregate tokens/s, the ratio to one async stream, and the ratio to llama-server.

    python benchmarks/bench_async.py [--counts 1,4,8] [--tokens 128] [--reps 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_server  # (puts tests/ on sys.path for upstream)
import upstream

import mullama
from mullama.generate._context import default_threads
from mullama.hub import _catalog, _pull

CTX_PER_STREAM = 1024


def async_round(async_model: mullama.AsyncModel, streams: int, tokens: int) -> float:
    """Aggregate tokens/s of ``streams`` concurrent async streams."""
    async def one(i: int) -> int:
        stream = async_model.generate_stream(f"Write story number {i} about a journey:", max_tokens=tokens,
                                             temperature=0, ignore_eos=True)
        async for _ in stream:
            pass
        return stream.tokens_generated()

    async def run() -> float:
        started = time.perf_counter()
        produced = await asyncio.gather(*(one(i) for i in range(streams)))
        assert all(n == tokens for n in produced), produced
        return sum(produced) / (time.perf_counter() - started)

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,4,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]

    build = upstream.build_with_tools()
    model_path = _pull.resolve(_catalog.DEFAULT_MODEL)
    model = mullama.Model.load(model_path)
    ours: dict[int, list[float]] = {n: [] for n in counts}
    theirs: dict[int, list[float]] = {n: [] for n in counts}
    for n in counts:
        async_model = mullama.AsyncModel(model, parallel=n, n_ctx=CTX_PER_STREAM, n_threads=args.threads)
        server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=args.threads,
                                      n_ctx=CTX_PER_STREAM * n, parallel=n)
        try:
            async_round(async_model, n, 8)  # warm-up (starts the engine)
            for _ in range(args.reps):
                time.sleep(1.0)  # let the other side's idle threads stop spinning first
                ours[n].append(async_round(async_model, n, args.tokens))
                time.sleep(1.0)
                theirs[n].append(asyncio.run(bench_server.run_clients(server.url, n, args.tokens))["aggregate_tps"])
        finally:
            server.close()
            assert async_model.engine is not None
            async_model.engine.close()
    model.close()

    figures = {n: {"mullama": statistics.median(ours[n]), "llama_server": statistics.median(theirs[n])}
               for n in counts}
    one = figures[counts[0]]["mullama"] if counts[0] == 1 else None
    print(f"model {model_path.name}, {args.threads} threads, {args.tokens} tokens per stream, "
          f"medians of {args.reps} rounds\n")
    print("| streams | AsyncModel tok/s (total) | vs one stream | llama-server -np N tok/s | ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in counts:
        row = figures[n]
        versus_one = f"{row['mullama'] / one:.3f}" if one else "—"
        print(f"| {n} | {row['mullama']:.1f} | {versus_one} | {row['llama_server']:.1f} | "
              f"{row['mullama'] / row['llama_server']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "tokens": args.tokens,
                                               "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
