#!/usr/bin/env python3
"""Leak hunt: load/close models, create/close contexts, and break off streams in every way.

Measures the heap (anonymous RSS: what a leak grows, while a mapped file's pages come and go with
the machine's other work) after warm-up (least-squares slope per iteration; sampled after glibc's
malloc_trim, so that memory the allocator merely keeps does not count), threads and file
descriptors before and after, and that every C object taken was freed exactly once.

    python stress/leaks.py [--models 200] [--contexts 1000] [--streams 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # build_llama, tests helpers; an installed mullama wins over the source tree

import mullama
from mullama.hub import _catalog, _pull
from mullama.native import _owned
from mullama.native._heap import give_back_memory


def heap_kb() -> int:
    """This process's anonymous resident memory (KB), after giving freed heap pages back."""
    give_back_memory()  # so that what the allocator merely keeps does not count
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def slope(samples: list[int]) -> float:
    """Least-squares growth per iteration (KB) over the second half of the samples: the first half is
    warm-up (caches fill, the async context pool reaches its size, allocator arenas settle)."""
    ys = samples[len(samples) // 2:]
    n = len(ys)
    if n < 2:
        return 0.0
    mean_x, mean_y = (n - 1) / 2, sum(ys) / n
    num = sum((x - mean_x) * (y - mean_y) for x, y in enumerate(ys))
    den = sum((x - mean_x) ** 2 for x in range(n))
    return num / den


def phase(name: str, iterations: int, step) -> dict:
    samples = []
    for i in range(iterations):
        step(i)
        if i % 10 == 0:
            gc.collect()
        samples.append(heap_kb())
    return {"name": name, "iterations": iterations, "heap_start_mb": samples[0] / 1024,
            "heap_end_mb": samples[-1] / 1024, "slope_kb_per_iter": slope(samples)}


def run(model_path: Path, *, models: int, contexts: int, streams: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    gc.collect()
    owned_before, freed_before = sum(_owned.owned_count.values()), sum(_owned.freed_count.values())
    threads_before = threading.active_count()
    fds_before = len(os.listdir("/proc/self/fd"))
    phases = []

    def load_close(_i):
        with mullama.Model.load(model_path) as model:
            model.tokenize("hello")

    phases.append(phase("load and close a model", models, load_close))

    model = mullama.Model.load(model_path)

    def context_cycle(_i):
        with mullama.Context(model, n_ctx=512):
            pass

    phases.append(phase("create and close a context", contexts, context_cycle))

    context = mullama.Context(model, n_ctx=512)
    amodel = mullama.AsyncModel(model, n_ctx=512)

    async def cancelled_stream(limit: int) -> None:
        started = asyncio.Event()

        async def consume():
            async for _ in amodel.generate_stream("Tell me a story:", max_tokens=64, temperature=0.8):
                started.set()
        task = asyncio.create_task(consume())
        await started.wait()
        for _ in range(limit):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    def broken_stream(_i):
        how = rng.choice(["break", "close", "gc", "cancel", "callback"])
        stop_at = rng.randrange(0, 12)
        if how == "cancel":
            asyncio.run(cancelled_stream(stop_at))
            return
        if how == "callback":
            count = [0]
            context.generate_streaming("Write a poem:", 64, lambda text: (count.__setitem__(0, count[0] + 1)
                                                                         or count[0] <= stop_at))
            return
        stream = context.generate_stream("Write a poem:", max_tokens=64, temperature=0.8)
        for i, _token in enumerate(stream):
            if i >= stop_at:
                break
        if how == "close":
            stream.close()
        elif how == "gc":
            del stream
            gc.collect()

    phases.append(phase("break off a stream (break, close, gc, asyncio cancel, callback)", streams, broken_stream))

    context.close()
    asyncio.run(amodel.aclose())  # ends the engine thread and frees its context
    model.close()  # ours: an AsyncModel closes only a model it loaded itself
    gc.collect()
    return {
        "phases": phases,
        "threads_before": threads_before, "threads_after": threading.active_count(),
        "fds_before": fds_before, "fds_after": len(os.listdir("/proc/self/fd")),
        "owned": sum(_owned.owned_count.values()) - owned_before,
        "freed": sum(_owned.freed_count.values()) - freed_before,
    }


def describe(report: dict) -> str:
    lines = [f"{p['name']}: {p['iterations']} times, heap {p['heap_start_mb']:.1f} -> {p['heap_end_mb']:.1f} MB, "
             f"slope {p['slope_kb_per_iter']:+.2f} KB/iteration after warm-up" for p in report["phases"]]
    lines.append(f"threads {report['threads_before']} -> {report['threads_after']}, file descriptors "
                 f"{report['fds_before']} -> {report['fds_after']}, C objects taken {report['owned']}, "
                 f"freed {report['freed']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--contexts", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=1000)
    args = parser.parse_args(argv)
    report = run(_pull.resolve(_catalog.DEFAULT_MODEL), models=args.models, contexts=args.contexts,
                 streams=args.streams)
    print(describe(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
