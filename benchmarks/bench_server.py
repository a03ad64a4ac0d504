#!/usr/bin/env python3
"""Server throughput: `mullama serve --parallel N` beside upstream `llama-server -np N`.

In one run, on the same model, threads and per-stream context: 1, 4 and 8 concurrent
streaming clients of 128 tokens each (``ignore_eos``, greedy), against each server in
turn, both servers up, rounds interleaved (medians reported). Reports aggregate tokens/s,
per-stream tokens/s, time to first token (median and p95) and whether every stream
completed, with the ratio mullama / llama-server.

    python benchmarks/bench_server.py [--parallel 4] [--clients 1,4,8] [--tokens 128] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # build_llama, tests helpers; an installed mullama wins over the source tree
sys.path.insert(0, str(REPO / "tests"))

import httpx
import upstream
from mullama_server import MullamaServer

from mullama.generate._context import default_threads
from mullama.hub import _catalog, _pull


async def one_stream(http: httpx.AsyncClient, url: str, prompt: str, tokens: int, model: str | None = None,
                     **fields: object) -> dict:
    """One streamed greedy completion (``fields`` change the request: ``ignore_eos`` is on unless
    told): time to first token, tokens, tokens/s, when it ended, and its text."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}, **({"model": model} if model else {}), **fields}
    started = time.perf_counter()
    first = last = None
    usage = None
    parts = []
    async with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            if data.get("choices") and data["choices"][0].get("text"):
                now = time.perf_counter()
                first = first or now
                last = now
                parts.append(data["choices"][0]["text"])
    n = usage["completion_tokens"] if usage else 0
    return {"ttft": (first - started) if first else None, "tokens": n,
            "tps": (n - 1) / (last - first) if first and last and last > first else 0.0, "end": last,
            "text": "".join(parts)}


async def run_clients(url: str, clients: int, tokens: int) -> dict:
    # No connection reuse: llama-server may close an idle keep-alive connection as it is reused.
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        await one_stream(http, url, "Warm up:", 8)
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, url, f"Write story number {i} about a journey:", tokens)
                                         for i in range(clients)))
        wall = max(r["end"] for r in results) - started
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "clients": clients,
        "complete": sum(r["tokens"] == tokens for r in results),
        "aggregate_tps": sum(r["tokens"] for r in results) / wall,
        "per_stream_tps": statistics.median(r["tps"] for r in results),
        "ttft_median_ms": statistics.median(ttfts) * 1e3,
        "ttft_p95_ms": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))] * 1e3,
    }


def median_row(rows: list[dict]) -> dict:
    """Each figure's median over the rounds; "complete" is the worst round's."""
    result = {key: statistics.median(r[key] for r in rows) for key in rows[0] if key not in ("clients", "complete")}
    return {**result, "clients": rows[0]["clients"], "complete": min(r["complete"] for r in rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--ctx-size", type=int, default=1024, help="context tokens per stream")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--reps", type=int, default=5, help="rounds; each figure is the median (default 5)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]

    build = upstream.build_with_tools()
    model = _pull.resolve(_catalog.DEFAULT_MODEL)
    theirs = upstream.LlamaServer(build.tool("llama-server"), model, threads=args.threads,
                                  n_ctx=args.ctx_size * args.parallel, parallel=args.parallel)
    ours = MullamaServer(model, parallel=args.parallel, ctx_size=args.ctx_size, threads=args.threads)
    runs: dict[tuple[str, int], list[dict]] = {}
    try:  # both servers up (an idle one sleeps), runs interleaved so drift affects both alike
        for _ in range(args.reps):
            for n in counts:
                for name, url in (("llama-server", theirs.url), ("mullama", ours.url)):
                    time.sleep(1.0)  # let the other server's idle threads stop spinning first
                    runs.setdefault((name, n), []).append(asyncio.run(run_clients(url, n, args.tokens)))
    finally:
        theirs.close()
        ours.close()
    figures = {name: [median_row(runs[(name, n)]) for n in counts] for name in ("llama-server", "mullama")}

    print(f"model {model.name}, {args.threads} threads, {args.parallel} slots, {args.tokens} tokens per stream\n")
    print("| clients | server | aggregate tok/s | per-stream tok/s | TTFT median ms | TTFT p95 ms | complete |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for mine, peer in zip(figures["mullama"], figures["llama-server"]):
        for name, row in (("llama-server", peer), ("mullama", mine)):
            print(f"| {row['clients']} | {name} | {row['aggregate_tps']:.1f} | {row['per_stream_tps']:.1f} | "
                  f"{row['ttft_median_ms']:.1f} | {row['ttft_p95_ms']:.1f} | {row['complete']}/{row['clients']} |")
        print(f"| {mine['clients']} | **ratio** | **{mine['aggregate_tps'] / peer['aggregate_tps']:.3f}** | "
              f"{mine['per_stream_tps'] / peer['per_stream_tps']:.3f} | "
              f"{mine['ttft_median_ms'] / peer['ttft_median_ms']:.3f} | "
              f"{mine['ttft_p95_ms'] / peer['ttft_p95_ms']:.3f} | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "parallel": args.parallel,
                                               "tokens": args.tokens, **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
