#!/usr/bin/env python3
"""Soak `mullama serve`: many requests from concurrent clients, mixing streams, non-streams,
disconnects and malformed bodies; then SIGTERM while streams are in flight.

Counts 5xx answers, streams lost or truncated (among those not disconnected on purpose),
the server's heap (anonymous RSS) after warm-up and at the end, and whether SIGTERM let the streams finish and the
process exit 0.

    python stress/soak_server.py [--requests 500] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # build_llama, tests helpers; an installed mullama wins over the source tree
sys.path.insert(0, str(REPO / "tests"))

import httpx
from mullama_server import MullamaServer

from mullama.hub import _catalog, _pull

MALFORMED = [b"{", b"[]", b'{"messages": 5}', b'{"prompt": ""}', b'{"max_tokens": -1, "prompt": "x"}',
             b'{"prompt": "x", "stop": [1]}', b'{"prompt": "x", "temperature": "hot"}', b"\xff\xfe\x00",
             b'{"prompt": "x", "n": 9}', b'{"messages": [{"role": "user"}]}']


async def stream_request(http, url, rng, disconnect: bool) -> dict:
    chat = rng.random() < 0.5
    max_tokens = rng.randrange(4, 48)
    body = {"max_tokens": max_tokens, "stream": True, "temperature": rng.choice([0, 0.7]),
            "stream_options": {"include_usage": True}}
    if chat:
        body["messages"] = [{"role": "user", "content": rng.choice(["Hi!", "Tell me a joke.", "Count to ten."])}]
    else:
        body["prompt"] = rng.choice(["Once upon a time", "The best way to learn is", "1, 2, 3,"])
    path = "/v1/chat/completions" if chat else "/v1/completions"
    lines, status = [], None
    async with http.stream("POST", url + path, json=body) as response:
        status = response.status_code
        async for line in response.aiter_lines():
            if line:
                lines.append(line)
            if disconnect and len(lines) >= 3:
                return {"kind": "disconnect", "status": status, "ok": True}
    ok = (status == 200 and lines and lines[-1] == "data: [DONE]"
          and any('"finish_reason": "' in line for line in lines) and any('"usage"' in line for line in lines))
    return {"kind": "stream", "status": status, "ok": bool(ok)}


async def plain_request(http, url, rng) -> dict:
    response = await http.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": rng.randrange(1, 24)})
    ok = response.status_code == 200 and "text" in response.json()["choices"][0]
    return {"kind": "plain", "status": response.status_code, "ok": ok}


async def malformed_request(http, url, rng) -> dict:
    response = await http.post(url + rng.choice(["/v1/completions", "/v1/chat/completions"]),
                               content=rng.choice(MALFORMED), headers={"Content-Type": "application/json"})
    return {"kind": "malformed", "status": response.status_code, "ok": 400 <= response.status_code < 500}


async def load(url: str, requests: int, concurrency: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    kinds = [rng.choice(["stream", "stream", "plain", "disconnect", "malformed"]) for _ in range(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for kind in kinds:
        queue.put_nowait(kind)
    results: list[dict] = []

    async def worker(worker_id: int):
        worker_rng = random.Random(seed * 100 + worker_id)
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as http:
            while not queue.empty():
                kind = queue.get_nowait()
                if kind in ("stream", "disconnect"):
                    results.append(await stream_request(http, url, worker_rng, kind == "disconnect"))
                elif kind == "plain":
                    results.append(await plain_request(http, url, worker_rng))
                else:
                    results.append(await malformed_request(http, url, worker_rng))

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return results


async def in_flight_then_sigterm(server: MullamaServer, streams: int) -> bool:
    async with httpx.AsyncClient(timeout=120) as http:
        async def one():
            lines = []
            async with http.stream("POST", server.url + "/v1/completions",
                                   json={"prompt": "Count:", "max_tokens": 80, "stream": True,
                                         "ignore_eos": True}) as response:
                async for line in response.aiter_lines():
                    if line:
                        lines.append(line)
            return lines and lines[-1] == "data: [DONE]"

        tasks = [asyncio.create_task(one()) for _ in range(streams)]
        await asyncio.sleep(0.3)
        server.process.terminate()
        return all(await asyncio.gather(*tasks))


def run(model_path: Path, *, requests: int, concurrency: int, seed: int = 0) -> dict:
    # The prompt cache keeps states on purpose, within its own budget (tests/test_prompt_cache.py): off
    # here, so that what the heap grows by is what leaks.
    server = MullamaServer(model_path, parallel=4, ctx_size=512, extra=("--cache-ram", "0"))
    try:
        asyncio.run(load(server.url, 20, concurrency, seed + 1))  # warm-up
        heap_warm = server.rss_mb("RssAnon")
        started = time.monotonic()
        results = asyncio.run(load(server.url, requests, concurrency, seed))
        elapsed = time.monotonic() - started
        finished = time.monotonic()
        server.wait_idle()
        idle_after = time.monotonic() - finished  # reported, not asserted
        heap_end = server.rss_mb("RssAnon")
        drained = asyncio.run(in_flight_then_sigterm(server, 3))
        exit_code = server.process.wait(60)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    by_kind: dict[str, int] = {}
    for r in results:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    return {
        "requests": len(results), "concurrency": concurrency, "seconds": elapsed, "by_kind": by_kind,
        "status_5xx": sum(r["status"] is not None and r["status"] >= 500 for r in results),
        "lost_or_truncated": sum(not r["ok"] for r in results if r["kind"] in ("stream", "plain")),
        "malformed_not_4xx": sum(not r["ok"] for r in results if r["kind"] == "malformed"),
        "heap_warm_mb": heap_warm, "heap_end_mb": heap_end, "idle_after_s": idle_after,
        "drained": drained, "exit_code": exit_code,
    }


def describe(report: dict) -> str:
    return (f"{report['requests']} requests at {report['concurrency']} concurrent clients in {report['seconds']:.1f} s "
            f"({report['by_kind']}): {report['status_5xx']} answers 5xx, {report['lost_or_truncated']} streams lost "
            f"or truncated, {report['malformed_not_4xx']} malformed requests not answered 4xx; server heap "
            f"{report['heap_warm_mb']:.1f} MB after warm-up, {report['heap_end_mb']:.1f} MB at the end; idle "
            f"{report['idle_after_s']:.2f} s after the last request; SIGTERM with streams in flight: "
            f"{'all finished' if report['drained'] else 'streams cut'}, exit code {report['exit_code']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    report = run(_pull.resolve(_catalog.DEFAULT_MODEL), requests=args.requests, concurrency=args.concurrency,
                 seed=args.seed)
    print(describe(report))
    return 0 if report["status_5xx"] == 0 and report["lost_or_truncated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
