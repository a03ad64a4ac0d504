#!/usr/bin/env python3
"""Predicted outputs (``StreamConfig.prediction``, OpenAI's ``prediction``) beside our plain decode.

Each prompt is answered once plainly (greedy, ``--tokens`` tokens); then the same prompt again with that
answer as the prediction, and with the answer edited (every tenth word replaced), as an application that
regenerates a text after a small change would. Figures: tokens per second (median of ``--reps``), each
against the plain decode, the drafted tokens accepted, and whether the answer is the plain one (it may
part from it at a near-tie: docs/speculative.md). ``--flash-attn off`` decodes every run without flash
attention. llama-server has no predicted outputs, so no upstream column.

    python benchmarks/bench_prediction.py [--model smollm2:135m] [--tokens 128] [--reps 3] [--flash-attn auto|off]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mullama
from mullama.generate._context import default_threads
from mullama.hub import _pull

PROMPTS = {
    "story": "Once upon a time, in a small village by the sea,",
    "history": "The history of the printing press",
    "recipe": "Here is a simple recipe for bread:",
}


def _edited(text: str) -> str:
    """``text`` with every tenth word replaced: a prediction that is mostly, not wholly, right."""
    words = text.split(" ")
    return " ".join("something" if i % 10 == 9 else word for i, word in enumerate(words))


def _run(context: mullama.Context, prompt: str, tokens: int, reps: int, **options) -> tuple[float, mullama.Completion]:
    times, completion = [], None
    for _ in range(reps):
        start = time.perf_counter()
        completion = context.generate(prompt, max_tokens=tokens, temperature=0, cache_prompt=False, **options)
        times.append(time.perf_counter() - start)
    assert completion is not None
    return len(completion.token_ids) / statistics.median(times), completion


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--flash-attn", choices=("auto", "off"), default="auto")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    model = mullama.Model.load(_pull.resolve(args.model))
    flash_attn = None if args.flash_attn == "auto" else False
    rows = []
    with mullama.Context(model, n_ctx=2048, n_threads=args.threads, flash_attn=flash_attn) as context:
        context.generate(PROMPTS["story"], max_tokens=16, cache_prompt=False)  # warm up: not timed
        for name, prompt in PROMPTS.items():
            plain_speed, plain = _run(context, prompt, args.tokens, args.reps)
            row = {"prompt": name, "plain tok/s": round(plain_speed, 1)}
            for kind, prediction in (("answer", plain.text), ("edited", _edited(plain.text))):
                speed, fast = _run(context, prompt, args.tokens, args.reps, prediction=prediction)
                row[f"{kind} tok/s"] = round(speed, 1)
                row[f"{kind} / plain"] = round(speed / plain_speed, 2)
                row[f"{kind} accepted"] = f"{fast.timings['draft_accepted']}/{fast.timings['draft_proposed']}"
                row[f"{kind} same answer"] = fast.token_ids == plain.token_ids
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.model}, {args.tokens} tokens, flash attention {args.flash_attn}, median of {args.reps}")
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[column]) for column in columns) + " |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"model": args.model, "tokens": args.tokens, "flash_attn": args.flash_attn, "rows": rows}, out,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
