#!/usr/bin/env python3
"""Streaming speed: mullama beside upstream llama-bench (and llama-cpp-python, given an interpreter with it).

Everything runs in this one process run, on the same model, threads and build, and the
table prints ratios, because machines of this kind differ from day to day:

- decode tokens/s: our sync and async streams vs ``llama-bench -p 0 -n 128`` (runs interleaved;
  llama-bench's tg decodes without sampling, our streams sample every token with llama.cpp's sampler);
- time to first token, 5-token prompt, fresh context, vs upstream's prompt-eval time for 5 tokens;
- the same prompt again on the same Context (prefix reuse) vs one decode step;
- per-token Python time beside the C calls (llama_decode, llama_sampler_sample);
- RSS growth over 1000 tokens with a slow async consumer.

    python benchmarks/bench_stream.py [--threads N] [--reps N] [--llama-cpp-python PYTHON] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # build_llama, tests helpers; an installed mullama wins over the source tree

from llama_cpp_python_peer import run_peer

import build_llama
import mullama
from mullama import AsyncModel, Context, Model
from mullama.generate._context import default_threads
from mullama.hub import _catalog, _pull

PROMPT_5 = "The capital of France is"  # checked to be 5 tokens below
DECODE_PROMPT = "Once upon a time"


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def llama_bench(binary: Path, model: Path, threads: int, n_prompt: int, n_gen: int, reps: int) -> float:
    """Average tokens/s of one llama-bench test."""
    out = subprocess.run([str(binary), "-m", str(model), "-t", str(threads), "-p", str(n_prompt),
                          "-n", str(n_gen), "-r", str(reps), "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


class TimedLib:
    """Wraps the cffi lib so the time spent inside chosen C functions is added up."""

    def __init__(self, lib, names):
        self._lib = lib
        self.spent = 0.0
        for name in names:
            setattr(self, name, self._timed(getattr(lib, name)))

    def _timed(self, function):
        perf_counter = time.perf_counter

        def call(*args):
            start = perf_counter()
            result = function(*args)
            self.spent += perf_counter() - start
            return result

        return call

    def __getattr__(self, name):
        return getattr(self._lib, name)


def wrapper_cost(lib) -> float:
    """Seconds one TimedLib wrapper adds to a call (measured on a trivial C function)."""
    timed = TimedLib(lib, ["llama_max_devices"])
    n = 200_000
    start = time.perf_counter()
    for _ in range(n):
        lib.llama_max_devices()
    bare = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        timed.llama_max_devices()
    return max(0.0, (time.perf_counter() - start - bare) / n)


def sync_decode(context: Context, n: int) -> float:
    stream = context.generate_stream(DECODE_PROMPT, max_tokens=n, temperature=0, ignore_eos=True)
    for _ in stream:
        pass
    assert stream.tokens_generated() == n
    return stream.tokens_per_second()


def async_decode(amodel: AsyncModel, n: int) -> float:
    async def run():
        stream = amodel.generate_stream(DECODE_PROMPT, max_tokens=n, temperature=0, ignore_eos=True)
        async for _ in stream:
            pass
        assert stream.tokens_generated() == n
        return stream.tokens_per_second()

    return asyncio.run(run())


def concurrent_async_decode(amodel: AsyncModel, n: int, streams: int) -> float:
    """Aggregate tokens/s of ``streams`` async streams run at once (each on its own context)."""
    async def one():
        stream = amodel.generate_stream(DECODE_PROMPT, max_tokens=n, temperature=0, ignore_eos=True)
        async for _ in stream:
            pass
        assert stream.tokens_generated() == n

    async def run():
        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(streams)))
        return streams * n / (time.perf_counter() - start)

    return asyncio.run(run())


def python_overhead(context: Context, n: int) -> float:
    """Seconds per token spent outside llama_decode and llama_sampler_sample."""
    real = context._lib
    timed = TimedLib(real, ["llama_decode", "llama_sampler_sample"])
    cost = wrapper_cost(real)
    context._lib = timed
    try:
        stream = context.generate_stream(DECODE_PROMPT, max_tokens=n, temperature=0, ignore_eos=True)
        sampler = stream._sequence.sampler  # samples through its own handle on the library: time it too
        sampler._lib = timed
        next(stream)
        c_before, t_before = timed.spent, time.perf_counter()
        count = 0
        for _ in stream:
            count += 1
        wall, c_time = time.perf_counter() - t_before, timed.spent - c_before
    finally:
        context._lib = real
    return (wall - c_time) / count - 2 * cost


def ttft_fresh(model: Model, threads: int, reps: int) -> float:
    times = []
    for _ in range(reps):
        with Context(model, n_ctx=2048, n_threads=threads) as ctx:
            start = time.perf_counter()
            with ctx.generate_stream(PROMPT_5, max_tokens=1, temperature=0) as stream:
                next(stream)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def ttft_again(context: Context, reps: int) -> float:
    list(context.generate_stream(PROMPT_5, max_tokens=1, temperature=0))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        with context.generate_stream(PROMPT_5, max_tokens=1, temperature=0) as stream:
            next(stream)
        times.append(time.perf_counter() - start)
        assert stream.cached_tokens == 4
    return statistics.median(times)


def slow_consumer_rss(amodel: AsyncModel, n: int) -> tuple[float, float, int]:
    async def run():
        stream = amodel.generate_stream(DECODE_PROMPT, max_tokens=n, temperature=0, ignore_eos=True,
                                        buffer_size=64)
        async for _ in stream:
            await asyncio.sleep(0.002)
        return stream.max_queued

    gc.collect()
    before = rss_mb()
    max_queued = asyncio.run(run())
    gc.collect()
    return before, rss_mb(), max_queued


def llama_cpp_python(python: str | None, model: Model, threads: int, n: int, reps: int) -> dict | None:
    """llama-cpp-python's decode speed and time to first token on the same prompts, in its own interpreter
    (``python``; None: not measured), with flash attention on as upstream's auto turns it on here."""
    if python is None:
        return None
    figures = run_peer(python, {"model": str(model.path), "threads": threads, "n_ctx": 2048, "flash_attn": True,
                                "reps": reps, "tokens": n, "decode": {"decode": model.tokenize(DECODE_PROMPT)},
                                "first_token": model.tokenize(PROMPT_5)})
    return {"tg": figures["decode"]["decode"]["tokens_per_second"], "ttft": figures["first_token_seconds"],
            "version": figures["version"]}


def table_rows(s: dict) -> list[tuple[str, str, str, str, str]]:
    """The report's rows (measure, mullama, reference, ratio, goal) from the figures main() saves."""
    up_tg, tokens = s["upstream_tg"], s.get("tokens", 128)
    rows = [
        ("decode tokens/s, sync stream", f"{s['sync_tg']:.1f}", f"llama-bench tg{tokens} {up_tg:.1f}",
         f"{s['sync_tg'] / up_tg:.3f}", "≥ 0.98"),
        ("decode tokens/s, async stream", f"{s['async_tg']:.1f}", f"llama-bench tg{tokens} {up_tg:.1f}",
         f"{s['async_tg'] / up_tg:.3f}", "≥ 0.98"),
        ("async / sync throughput", f"{s['async_tg']:.1f}", f"sync {s['sync_tg']:.1f}",
         f"{s['async_tg'] / s['sync_tg']:.3f}", "≥ 0.98"),
    ]
    if "concurrent_async_tg" in s:
        rows.append(("3 concurrent async streams, total tokens/s", f"{s['concurrent_async_tg']:.1f}",
                     f"one async stream {s['async_tg']:.1f}", f"{s['concurrent_async_tg'] / s['async_tg']:.3f}",
                     "≥ 0.95"))
    rows += [
        ("time to first token, 5-token prompt, fresh context (ms)", f"{s['ttft_fresh_ms']:.2f}",
         f"llama-bench pp5 {s['upstream_pp5_ms']:.2f}", f"{s['ttft_fresh_ms'] / s['upstream_pp5_ms']:.3f}", "≤ 1.05"),
        ("same prompt again on the same context (ms)", f"{s['ttft_again_ms']:.2f}",
         f"one decode step {1000 / up_tg:.2f}", f"{s['ttft_again_ms'] * up_tg / 1000:.3f}", "≤ 1 step"),
        ("Python time per token beside the C calls (µs)", f"{s['python_overhead_us']:.1f}", "—", "—", "≤ 35"),
        ("RSS growth, slow consumer, 1000 tokens (MB)", f"{s['rss_growth_mb']:.2f}", "—", "—", "≤ 5"),
    ]
    peer = s.get("llama_cpp_python")
    if peer:
        rows += [
            ("llama-cpp-python decode tokens/s", f"{peer['tg']:.1f}", f"llama-bench tg{tokens} {up_tg:.1f}",
             f"{peer['tg'] / up_tg:.3f}", "(peer)"),
            ("llama-cpp-python time to first token, 5 tokens (ms)", f"{peer['ttft'] * 1e3:.2f}",
             f"llama-bench pp5 {s['upstream_pp5_ms']:.2f}", f"{peer['ttft'] * 1e3 / s['upstream_pp5_ms']:.3f}",
             "(peer)"),
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--llama-cpp-python", metavar="PYTHON",
                        help="an interpreter with llama-cpp-python installed, to measure it beside us")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    build = build_llama.build(tools=["llama-bench"])
    model_path = _pull.resolve(_catalog.DEFAULT_MODEL)
    model = Model.load(model_path)
    assert len(model.tokenize(PROMPT_5)) == 5
    print(f"model {model_path.name}, {args.threads} threads, library {mullama.system_info()['library_path']}",
          flush=True)

    bench = build.tool("llama-bench")
    up_pp5 = llama_bench(bench, model_path, args.threads, 5, 0, max(args.reps, 10))
    up_pp5_s = 5 / up_pp5

    context = Context(model, n_ctx=2048, n_threads=args.threads)
    amodel = AsyncModel(model, n_ctx=2048, n_threads=args.threads)
    sync_decode(context, 16)
    async_decode(amodel, 16)  # warm-up both paths
    up_tps, sync_tps, async_tps = [], [], []
    for _ in range(args.reps):  # interleaved, so that the machine's drift affects all three alike
        up_tps.append(llama_bench(bench, model_path, args.threads, 0, args.tokens, 1))
        sync_tps.append(sync_decode(context, args.tokens))
        async_tps.append(async_decode(amodel, args.tokens))
    up_tg = statistics.median(up_tps)
    ours_tg, ours_async_tg = statistics.median(sync_tps), statistics.median(async_tps)
    concurrent = statistics.median(concurrent_async_decode(amodel, args.tokens, 3) for _ in range(3))
    overhead = statistics.median(python_overhead(context, 256) for _ in range(3))
    fresh = ttft_fresh(model, args.threads, max(args.reps, 10))
    again = ttft_again(context, max(args.reps, 10))
    rss_before, rss_after, max_queued = slow_consumer_rss(amodel, 1000)
    peer = llama_cpp_python(args.llama_cpp_python, model, args.threads, args.tokens, args.reps)

    figures = {
        "threads": args.threads, "tokens": args.tokens, "upstream_tg": up_tg, "upstream_pp5_ms": up_pp5_s * 1e3,
        "sync_tg": ours_tg, "async_tg": ours_async_tg, "concurrent_async_tg": concurrent,
        "ttft_fresh_ms": fresh * 1e3, "ttft_again_ms": again * 1e3, "python_overhead_us": overhead * 1e6,
        "rss_growth_mb": rss_after - rss_before, "max_queued": max_queued, "llama_cpp_python": peer,
    }
    print()
    print("| measure | mullama | upstream / reference | ratio | goal |")
    print("| --- | ---: | ---: | ---: | --- |")
    for row in table_rows(figures):
        print("| " + " | ".join(row) + " |")
    if peer is None:
        print("\nllama-cpp-python: not measured (--llama-cpp-python PYTHON names an interpreter that has it)")
    print(f"\nslow consumer: at most {max_queued} tokens waited in the buffer of 64")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    context.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
