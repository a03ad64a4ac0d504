#!/usr/bin/env python3
"""How long ``/health`` takes while the server builds a large answer (issue 28, items 8 and 10):

- a non-streamed completion with ``n`` choices, ``max_tokens`` each (``ignore_eos``) and
  ``top_logprobs`` (``logprobs``), whose JSON is megabytes;
- an embedding request of ``--inputs`` texts (2048: OpenAI's limit), whose JSON is tens of megabytes.

While each is in flight, ``/health`` is asked again and again (one at a time); the slowest and the
median answers are printed, with the size of the big answer. The event loop must answer ``/health``
within 100 ms whatever is being built (the answers are built and encoded on worker threads).

    python benchmarks/bench_health_latency.py [--n 8] [--max-tokens 512] [--top-logprobs 20] [--inputs 2048]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import httpx
from mullama_server import MullamaServer


def health_while(url: str, path: str, body: dict) -> tuple[list[float], int, float]:
    """/health latencies (ms) while ``body`` is posted to ``path``; the answer's size and seconds."""
    done = threading.Event()
    result: dict = {}

    def big() -> None:
        started = time.perf_counter()
        answer = httpx.post(url + path, json=body, timeout=1800)
        result["seconds"] = time.perf_counter() - started
        result["size"] = len(answer.content)
        assert answer.status_code == 200, answer.text[:500]
        done.set()

    worker = threading.Thread(target=big)
    worker.start()
    latencies = []
    with httpx.Client(timeout=60) as client:
        while not done.is_set():
            started = time.perf_counter()
            assert client.get(url + "/health").status_code == 200
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(0.01)
    worker.join()
    return latencies, result["size"], result["seconds"]


def report(label: str, latencies: list[float], size: int, seconds: float) -> None:
    print(f"{label}: answer {size / 1e6:.1f} MB in {seconds:.1f} s; /health x{len(latencies)}: "
          f"median {statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--top-logprobs", type=int, default=20)
    parser.add_argument("--inputs", type=int, default=2048)
    args = parser.parse_args()
    server = MullamaServer("smollm2:135m", parallel=args.n, ctx_size=1024)
    try:
        completion = {"prompt": "Once upon a time", "n": args.n, "max_tokens": args.max_tokens, "ignore_eos": True,
                      "logprobs": args.top_logprobs, "temperature": 1.0, "seed": 1}
        report(f"completion n={args.n} max_tokens={args.max_tokens} top_logprobs={args.top_logprobs}",
               *health_while(server.url, "/v1/completions", completion))
        texts = [f"Sentence {i} about the weather, the sea and the hills near the town." for i in range(args.inputs)]
        report(f"embeddings of {args.inputs} inputs", *health_while(server.url, "/v1/embeddings", {"input": texts}))
    finally:
        server.close()


if __name__ == "__main__":
    main()
