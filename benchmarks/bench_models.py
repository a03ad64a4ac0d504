#!/usr/bin/env python3
"""Serving several models: `mullama serve --models-dir DIR` beside upstream's router,
`llama-server --models-dir DIR` (which starts one llama-server process per model), on the
same two models (SmolLM2 135M and Gemma 3 270M), threads and per-stream context, in one run:

- cold time to first token: the model not loaded; a streamed request names it (load + prompt +
  first token), a fresh server each round;
- warm time to first token: the model loaded, a new prompt (the median of five);
- aggregate tokens/s with both models active: two streaming clients per model at once,
  ``--tokens`` each (``ignore_eos``, greedy).

Medians of ``--reps`` rounds, with the ratio mullama / llama-server (below 1 is faster for TTFT,
above 1 is faster for tokens/s).

    python benchmarks/bench_models.py [--reps 3] [--tokens 128] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import httpx
import upstream
from bench_server import one_stream
from mullama_server import MullamaServer

from mullama.generate._context import default_threads
from mullama.hub import _pull

MODELS = {"smollm2": "smollm2:135m", "gemma3": "gemma3:270m"}  # file stem in the directory -> hub name
PARALLEL = 2


class Servers:
    """Both servers on the same directory of models, neither with a model loaded yet."""

    def __init__(self, directory: Path, threads: int, ctx_size: int) -> None:
        build = upstream.build_with_tools()
        self.theirs = upstream.LlamaServer(build.tool("llama-server"), None, threads=threads,
                                           n_ctx=ctx_size * PARALLEL, parallel=PARALLEL,
                                           extra=("--models-dir", str(directory)))
        self.ours = MullamaServer(None, parallel=PARALLEL, ctx_size=ctx_size, threads=threads,
                                  extra=("--models-dir", str(directory)))

    def urls(self) -> list[tuple[str, str]]:
        return [("llama-server", self.theirs.url), ("mullama", self.ours.url)]

    def close(self) -> None:
        self.theirs.close()
        self.ours.close()


async def ttft(url: str, model: str, prompt: str) -> float:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        result = await one_stream(http, url, prompt, 2, model)
    return result["ttft"]


async def aggregate(url: str, tokens: int) -> float:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        started = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, url, f"Write story number {i} about a journey:", tokens,
                                                     model) for model in MODELS for i in range(PARALLEL)))
    wall = max(r["end"] for r in results) - started
    assert all(r["tokens"] == tokens for r in results), results
    return sum(r["tokens"] for r in results) / wall


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--ctx-size", type=int, default=1024, help="context tokens per stream")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--reps", type=int, default=3, help="rounds; each figure is the median (default 3)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    directory = Path(tempfile.mkdtemp(prefix="mullama-models-"))
    for stem, name in MODELS.items():
        (directory / f"{stem}.gguf").symlink_to(_pull.resolve(name))
    rows: dict[str, dict[str, list[float]]] = {"llama-server": {}, "mullama": {}}

    def record(server: str, figure: str, value: float) -> None:
        rows[server].setdefault(figure, []).append(value)

    for round_ in range(args.reps):
        servers = Servers(directory, args.threads, args.ctx_size)
        try:
            for model in MODELS:  # cold: the first request to name the model loads it
                for server, url in servers.urls():
                    time.sleep(1.0)
                    record(server, f"cold TTFT {model} (ms)", asyncio.run(ttft(url, model, "Hello there,")) * 1e3)
            for model in MODELS:  # warm: five new prompts each (no prefix to reuse but the BOS)
                for server, url in servers.urls():
                    time.sleep(1.0)
                    times = [asyncio.run(ttft(url, model, f"Question {round_}.{i}: tell me about the sea,"))
                             for i in range(5)]
                    record(server, f"warm TTFT {model} (ms)", statistics.median(times) * 1e3)
            for server, url in servers.urls():
                time.sleep(1.0)
                record(server, "two models, 4 streams: aggregate tok/s", asyncio.run(aggregate(url, args.tokens)))
        finally:
            servers.close()

    figures = {server: {figure: statistics.median(values) for figure, values in by_figure.items()}
               for server, by_figure in rows.items()}
    print(f"models {', '.join(MODELS.values())}; {args.threads} threads, {PARALLEL} streams per model, "
          f"{args.ctx_size} tokens each; medians of {args.reps}\n")
    print("| figure | llama-server (router) | mullama | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for figure, theirs in figures["llama-server"].items():
        mine = figures["mullama"][figure]
        print(f"| {figure} | {theirs:.1f} | {mine:.1f} | {mine / theirs:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "parallel": PARALLEL, "tokens": args.tokens,
                                               "rounds": rows, **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
