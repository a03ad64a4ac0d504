#!/usr/bin/env python3
"""Decoding beside other work: our measured thread count vs fixed counts and upstream's llama-bench.

On a machine whose cores other processes also want, llama.cpp's threads wait for each other at
every graph step, and all cores can be many times slower than one. A context made with
``n_threads="auto"`` chooses by timing its steps (mullama.native._compute.ThreadChoice). This runs, in one
process run, for each number of busy neighbours (processes spinning on a core): our stream with the
measured count, with all cores and with one, and ``llama-bench -n N`` with all cores and one, and
prints tokens/s and the ratio of ours (measured) to the best fixed one.

    python benchmarks/bench_busy.py [--neighbours 0,2,4] [--tokens N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))

from bench_stream import llama_bench

import build_llama
import mullama
from mullama.hub import _catalog, _pull
from mullama.native import _library
from mullama.native._compute import default_threads

PROMPT = "Once upon a time"


def spin() -> None:
    while True:
        pass


def ours(model: mullama.Model, n_threads: int | str, tokens: int) -> float:
    """Decode tokens/s of one greedy stream of ``tokens`` tokens on a fresh Context."""
    if n_threads == "auto":
        _library.get().compute.reset_threads()  # choose afresh, as a new process would
    with mullama.Context(model, n_ctx=max(512, tokens + 64), n_threads=n_threads) as context:
        stream = context.generate_stream(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True, timeout_ms=None)
        next(stream)  # the prompt is decoded: time the token steps only
        started = time.perf_counter()
        count = sum(1 for _ in stream)
        return count / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbours", default="0,2,4", help="busy processes beside us, per row")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    build = build_llama.build(tools=["llama-bench"])
    model_path = _pull.resolve(_catalog.DEFAULT_MODEL)
    model = mullama.Model.load(model_path)
    most = default_threads()
    rows = []
    for neighbours in (int(n) for n in args.neighbours.split(",")):
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(neighbours)]
        for process in spinners:
            process.start()
        try:
            row = {"neighbours": neighbours,
                   "ours_measured": ours(model, "auto", args.tokens),
                   "ours_all": ours(model, most, args.tokens),
                   "ours_one": ours(model, 1, args.tokens),
                   "chosen": _library.get().compute.threads.current}
            for name, threads in (("llama_bench_all", most), ("llama_bench_one", 1)):
                row[name] = llama_bench(build.tool("llama-bench"), model_path, threads, 0, args.tokens, 1)
        finally:
            for process in spinners:
                process.kill()
                process.join()
        rows.append(row)
    print(f"model {model_path.name}, {most} CPUs, {args.tokens} tokens, tokens/s")
    print(f"{'busy':>4} {'measured':>9} {'ours all':>9} {'ours 1':>9} {'bench all':>9} {'bench 1':>9}"
          f" {'measured / best fixed':>22}")
    for r in rows:
        best = max(r["ours_all"], r["ours_one"])
        print(f"{r['neighbours']:>4} {r['ours_measured']:>9.1f} {r['ours_all']:>9.1f} {r['ours_one']:>9.1f}"
              f" {r['llama_bench_all']:>9.1f} {r['llama_bench_one']:>9.1f} {r['ours_measured'] / best:>22.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": most, "tokens": args.tokens, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
