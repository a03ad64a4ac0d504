#!/usr/bin/env python3
"""Prompt cache: a long shared system prompt, then many questions from several clients.

`mullama serve` beside upstream `llama-server` (same model, threads, slots and per-slot context),
each with its prompt cache on (the default). A ~1,500-token system prompt is asked one question
first, alone (cold); then ``--clients`` clients ask ``--questions`` more between them, each client
one after another, all clients at once. Reports time to first token of the first request and the
median / p95 of the rest, their ratio, and how many greedy answers equal a cold decode of the same
prompt on the same server (``cache_prompt: false``). The server's RSS growth is printed beside
``--cache-ram``.

    python benchmarks/bench_prompt_cache.py [--clients 4] [--questions 20] [--parallel 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # build_llama, tests helpers; an installed mullama wins over the source tree
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import httpx
import upstream
from bench_server import one_stream
from mullama_server import MullamaServer

from mullama import Model
from mullama.generate._context import default_threads
from mullama.hub import _catalog, _pull

FACTS = [f"Fact {i}: the {colour} box in room {i * 7 % 50} holds {i * 13 % 97} {thing}, last counted on day "
         f"{i * 3 % 28 + 1}."
         for i, (colour, thing) in enumerate(
             ((c, t) for c in ("red", "blue", "green", "yellow", "black", "white", "purple", "orange")
              for t in ("apples", "keys", "books", "stones", "coins", "letters", "maps", "cups")), start=1)]
SYSTEM = ("You are a warehouse assistant. Answer in one short sentence, using only these facts.\n"
          + "\n".join(FACTS[:54]) + "\n")
QUESTIONS = [f"Question: what does fact {i} say is in the box?\nAnswer:" for i in range(1, 55)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def ask(http: httpx.AsyncClient, url: str, prompt: str, tokens: int, *, cache: bool = True) -> dict:
    """One streamed greedy answer (ending where the model ends it): time to first token, text."""
    answer = await one_stream(http, url, prompt, tokens, ignore_eos=False, cache_prompt=cache)
    return {"ttft": answer["ttft"] or 0.0, "text": answer["text"]}


async def scenario(url: str, clients: int, questions: int, tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        first = await ask(http, url, SYSTEM + QUESTIONS[0], tokens)
        rest = QUESTIONS[1:questions]

        async def client(mine: list[str]) -> list[dict]:
            return [await ask(http, url, SYSTEM + q, tokens) for q in mine]

        answers = await asyncio.gather(*(client(rest[c::clients]) for c in range(clients)))
        later = [a for batch in answers for a in batch]
        cold = [await ask(http, url, SYSTEM + q, tokens, cache=False) for q in QUESTIONS[:questions]]
    warm = [first] + [a for c in range(clients) for a in answers[c]]
    asked = [QUESTIONS[0]] + [q for c in range(clients) for q in rest[c::clients]]
    cold_by_question = dict(zip(QUESTIONS[:questions], cold))
    equal = sum(a["text"] == cold_by_question[q]["text"] for a, q in zip(warm, asked))
    ttfts = sorted(a["ttft"] for a in later)
    return {"first_ms": first["ttft"] * 1000, "later_median_ms": statistics.median(ttfts) * 1000,
            "later_p95_ms": ttfts[max(0, round(0.95 * len(ttfts)) - 1)] * 1000, "equal": equal, "asked": len(warm)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--ctx-size", type=int, default=2048, help="context tokens per slot")
    parser.add_argument("--cache-ram", type=int, default=8192, help="MiB, both servers")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    build = upstream.build_with_tools()
    model = _pull.resolve(_catalog.DEFAULT_MODEL)
    servers = {
        "mullama": lambda: MullamaServer(model, parallel=args.parallel, ctx_size=args.ctx_size,
                                         threads=args.threads, extra=("--cache-ram", str(args.cache_ram))),
        "llama-server": lambda: upstream.LlamaServer(build.tool("llama-server"), model, threads=args.threads,
                                                     n_ctx=args.ctx_size * args.parallel, parallel=args.parallel,
                                                     extra=("--cache-ram", str(args.cache_ram))),
    }
    rows = {}
    for name, start in servers.items():  # one at a time: each has the machine to itself
        server = start()
        try:
            before = rss_mb(server.process.pid)
            rows[name] = asyncio.run(scenario(server.url, args.clients, args.questions, args.tokens))
            rows[name]["rss_growth_mb"] = rss_mb(server.process.pid) - before
        finally:
            server.close()

    n_system = len(Model.load(model, vocab_only=True).tokenize(SYSTEM))
    print(f"model {model.name}, {args.threads} threads, {args.parallel} slots, system prompt {n_system} tokens, "
          f"{args.questions} questions from {args.clients} clients, --cache-ram {args.cache_ram} MiB\n")
    print("| server | TTFT first ms | TTFT later median ms | later p95 ms | later / first | equal to cold | "
          "RSS growth MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        print(f"| {name} | {row['first_ms']:.1f} | {row['later_median_ms']:.1f} | {row['later_p95_ms']:.1f} | "
              f"{row['later_median_ms'] / row['first_ms']:.3f} | {row['equal']}/{row['asked']} | "
              f"{row['rss_growth_mb']:.0f} |")
    mine, peer = rows["mullama"], rows["llama-server"]
    print(f"| **ratio** | {mine['first_ms'] / peer['first_ms']:.3f} | "
          f"{mine['later_median_ms'] / peer['later_median_ms']:.3f} | "
          f"{mine['later_p95_ms'] / peer['later_p95_ms']:.3f} | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
