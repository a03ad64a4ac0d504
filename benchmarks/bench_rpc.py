#!/usr/bin/env python3
"""Decoding over llama.cpp's RPC backend: mullama beside upstream llama-server, both with every
layer (-ngl 99) on the same two `ggml-rpc-server` processes on 127.0.0.1, in one run.

A ggml-rpc-server serves one client at a time, so the two take turns: each round runs mullama (in
a child process, which frees the servers when it exits), then llama-server. Greedy, ``--tokens``
generated tokens after a short prompt; mullama's figure is tokens / decode time measured by the
sequence, llama-server's its own ``predicted_per_second``. Medians of ``--reps``.

    python benchmarks/bench_rpc.py [--reps 3] [--tokens 128] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import upstream
from test_rpc import RPCServer

from mullama.generate._context import default_threads
from mullama.hub import _catalog, _pull

PROMPT = "Write a story about a journey:"


def ours(model: Path, servers: list[str], tokens: int) -> float:
    script = textwrap.dedent(f"""
        import mullama
        model = mullama.Model.load({str(model)!r}, n_gpu_layers=99, rpc_servers={servers!r})
        context = mullama.Context(model, n_ctx=1024)
        context.generate("Hello", max_tokens=4)  # warm up
        context.clear()
        with context.generate_stream({PROMPT!r}, max_tokens={tokens}, ignore_eos=True, temperature=0) as stream:
            for _ in stream:
                pass
        print(stream.tokens_per_second())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    return float(done.stdout.split()[-1])


def theirs(binary: Path, model: Path, servers: list[str], tokens: int) -> float:
    server = upstream.LlamaServer(binary, model, threads=default_threads(),
                                  extra=("--rpc", ",".join(servers), "-ngl", "99"))
    try:
        server.post("/completion", {"prompt": "Hello", "n_predict": 4})  # warm up
        answer = server.post("/completion", {"prompt": PROMPT, "n_predict": tokens, "ignore_eos": True,
                                             "temperature": 0, "cache_prompt": False})
        return float(answer["timings"]["predicted_per_second"])
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    build = upstream.build_with_tools()
    model = _pull.resolve(_catalog.DEFAULT_MODEL)
    rpc = [RPCServer(build.tool("ggml-rpc-server")) for _ in range(2)]
    addresses = [server.address for server in rpc]
    rows: dict[str, list[float]] = {"mullama": [], "llama-server": []}
    try:
        for _ in range(args.reps):
            rows["mullama"].append(ours(model, addresses, args.tokens))
            rows["llama-server"].append(theirs(build.tool("llama-server"), model, addresses, args.tokens))
    finally:
        for server in rpc:
            server.close()
    mine, peer = statistics.median(rows["mullama"]), statistics.median(rows["llama-server"])
    print(f"model {model.name}, every layer on two ggml-rpc-server processes (127.0.0.1, 1 thread each), "
          f"{args.tokens} tokens; medians of {args.reps}\n")
    print("| decode over RPC | llama-server | mullama | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| tokens/s | {peer:.1f} | {mine:.1f} | **{mine / peer:.3f}** |")
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": args.tokens, "rounds": rows, "mullama": mine,
                                               "llama-server": peer}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
