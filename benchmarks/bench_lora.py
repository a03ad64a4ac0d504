#!/usr/bin/env python3
"""LoRA adapter sets in the batching engine: four greedy streams of 64 tokens at once on four slots,
with one adapter set for all, or two, or four different sets (the engine decodes one set per batch,
the sets taking turns: see mullama.generate._lora.batch_lora). Prints wall time, decode steps and
tokens/s per case. The adapter is a random one written by tools/make_lora.py for SmolLM2.

    python benchmarks/bench_lora.py [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mullama
from mullama.hub import _catalog, _pull

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"
CASES = {
    "4 streams, one set (the adapter)": [None] * 4,
    "4 streams, no adapter": [{}] * 4,
    "4 streams, 2 sets": [None, None, {}, {}],
    "4 streams, 4 sets": [None, {}, {0: 0.5}, {0: 2.0}],
}


async def run(model: mullama.AsyncModel, sets: list, tokens: int) -> tuple[float, int]:
    async def one(lora: dict | None) -> int:
        stream = model.generate_stream(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True,
                                       timeout_ms=3_600_000, lora=lora)
        async with stream:
            return len([token async for token in stream])

    engine = model.engine
    assert engine is not None
    steps = engine.stats["decode_steps"]
    started = time.perf_counter()
    await asyncio.gather(*(one(lora) for lora in sets))
    return time.perf_counter() - started, engine.stats["decode_steps"] - steps


async def main(tokens: int) -> None:
    path = _pull.resolve(_catalog.DEFAULT_MODEL)
    with tempfile.TemporaryDirectory() as directory:
        adapter = Path(directory) / "adapter.gguf"
        subprocess.run([sys.executable, str(REPO / "tools" / "make_lora.py"), str(adapter), "--for", str(path)],
                       check=True, capture_output=True)
        model = await mullama.AsyncModel.load(path, lora=[(adapter, 1.0)], parallel=4)
        async with model:
            await run(model, [None], 8)  # warm up
            for name, sets in CASES.items():
                seconds, steps = await run(model, sets, tokens)
                print(f"{name}: {seconds:.2f} s, {steps} decode steps, {len(sets) * tokens / seconds:.0f} tokens/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    asyncio.run(main(parser.parse_args().tokens))
