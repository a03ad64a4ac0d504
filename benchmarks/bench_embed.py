#!/usr/bin/env python3
"""Embedding throughput, mullama vs llama-server (and llama-cpp-python where installed), in one run.

Embeds ``--texts`` short sentences (256 by default) with mean pooling, normalised:
mullama in this process (``model.embed(texts)``, and through the server's ``/v1/embeddings``,
on uvicorn in this process), llama-server ``--embeddings --pooling mean`` with one slot and with four
(its default batching, whose vectors differ from its one-slot ones by up to 0.2 on this pin:
see docs/embeddings.md), each answering one request holding every text. Rounds are
interleaved; medians of ``--reps``. Prints texts/s, tokens/s and ratios to llama-server.

    python benchmarks/bench_embed.py [--model all-minilm:l6-v2] [--texts 256] [--reps 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_server  # noqa: F401  (puts tests/ on sys.path for upstream)
import upstream
from inprocess_server import InProcessServer

import mullama
from mullama.generate._context import default_threads
from mullama.hub import _catalog, _pull
from mullama.server import ServerSettings, create_app

SUBJECTS = ["The weather", "A small cat", "Our team", "The new library", "This recipe", "A train to Paris",
            "The museum", "My laptop"]
VERBS = ["changed quickly", "looks better than before", "was hard to find", "needs more testing",
         "surprised everyone", "is open on Sundays", "runs on two cores", "got good reviews"]


def texts(count: int) -> list[str]:
    """``count`` different short sentences (about 8 to 12 tokens each)."""
    return [f"{SUBJECTS[i % 8]} {VERBS[(i // 8) % 8]} (note {i})." for i in range(count)]


def timed(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def post(url: str, inputs: list[str]) -> None:
    import httpx

    response = httpx.post(f"{url}/v1/embeddings", json={"input": inputs, "encoding_format": "float"}, timeout=600)
    response.raise_for_status()
    assert len(response.json()["data"]) == len(inputs)


def llama_cpp_python(model_path: Path, threads: int) -> Callable[[list[str]], object] | None:
    """llama-cpp-python's create_embedding, if that package is installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(model_path), embedding=True, n_threads=threads, verbose=False,
                          pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    return lambda inputs: llm.create_embedding(inputs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=_catalog.DEFAULT_MODEL)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    build = upstream.build_with_tools()
    model_path = _pull.resolve(args.model)
    inputs = texts(args.texts)
    model = mullama.Model.load(model_path)
    n_tokens = sum(len(model.tokenize(text, add_special=True, parse_special=True)) for text in inputs)
    runners: dict[str, Callable[[], object]] = {"mullama embed()": lambda: model.embed(inputs, pooling="mean")}
    with contextlib.ExitStack() as stack:
        ours = InProcessServer(create_app(model, None, ServerSettings(model_name=args.model)))  # embeddings only
        stack.callback(ours.close)
        runners["mullama serve"] = lambda: post(ours.url, inputs)
        for slots in (1, 4):
            peer = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=args.threads,
                                        parallel=slots, n_ctx=512 * slots, extra=("--embeddings", "--pooling", "mean"))
            stack.callback(peer.close)
            runners[f"llama-server -np {slots}"] = lambda url=peer.url: post(url, inputs)
        other = llama_cpp_python(model_path, args.threads)
        if other is not None:
            runners["llama-cpp-python"] = lambda: other(inputs)
        for run in runners.values():  # warm-up
            run()
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(args.reps):
            for name, run in runners.items():
                time.sleep(0.5)
                seconds[name].append(timed(run))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    reference = median["llama-server -np 1"]
    print(f"model {model_path.name}, {args.texts} texts ({n_tokens} tokens), {args.threads} threads, "
          f"medians of {args.reps}{'' if 'llama-cpp-python' in median else '; llama-cpp-python not installed'}\n")
    print("| embedder | texts/s | tokens/s | vs llama-server -np 1 |")
    print("| --- | ---: | ---: | ---: |")
    for name, value in median.items():
        print(f"| {name} | {args.texts / value:.1f} | {n_tokens / value:.0f} | {reference / value:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_path.name, "texts": args.texts, "tokens": n_tokens,
                                               "threads": args.threads, "seconds": median}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
