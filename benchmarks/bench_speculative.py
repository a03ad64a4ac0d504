#!/usr/bin/env python3
"""Speculative decoding: our plain decode, ours with n-gram speculation, and llama-server's with the same settings.

Greedy decode speed (generated tokens over the time after the prompt) on grounded prompts (a ~400-token
passage to repeat, quote or summarise, a code file to edit: the answer copies the prompt) and on open
prompts (nothing to copy: speculation must cost nothing there), each a user's message through the model's
chat template. Ours runs ``speculative="ngram"`` (upstream's ngram-simple drafts, sized by how drafts
fare); llama-server runs ``--spec-type ngram-simple`` with the same n-gram sizes, ``cache_prompt: false``.
The ceiling column is ours with ngram-simple's drafts cut to exactly the part that will be accepted (the
drafter is told the speculative answer): no sizing of these drafts can beat it, so it shows what the
prompt allows on this machine. (Told the plain answer instead, it would stop at the first near-tie where
one-token decoding and batches part; where its own batches part from the speculative answer, it is told
its own.) ``--flash-attn`` sets attention for all three alike: on a CPU, upstream's default ("auto": on)
makes every row of a verify batch read the whole cache, so speculation gains far more with it off.
Rounds are interleaved so drift in the machine's speed hits all alike; each figure is the median over
``--reps`` rounds. Prints tokens/s, the ratios to our plain decode and to llama-server's speculative
decode, drafted tokens accepted/proposed, and whether ours gave llama-server's tokens. Given an interpreter
with llama-cpp-python (``--llama-cpp-python PYTHON``), a second table puts its plain greedy decode and its
prompt lookup (``LlamaPromptLookupDecoding`` with its defaults, its answer to speculative decoding) beside
ours, each round in a process of its own (benchmarks/llama_cpp_python_peer.py).

    python benchmarks/bench_speculative.py [--model smollm2:135m] [--tokens 128] [--reps 3]
                                           [--flash-attn auto|on|off] [--llama-cpp-python PYTHON] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_server  # noqa: F401  (puts tests/ on sys.path for upstream)
import upstream
from llama_cpp_python_peer import run_peer

import mullama
from mullama.cli._args import flash_attn_option
from mullama.generate import _sequence
from mullama.generate._context import default_threads
from mullama.generate._model import tokenize_prompt
from mullama.generate._speculative import NgramDrafter
from mullama.hub import _pull

PASSAGE = """The harbour town of Kessel grew up around a single stone pier, built in 1742 by the merchants who \
traded salt and timber along the northern coast. For a century the pier was the only place where ships of any \
size could unload, and the town's streets still follow the carts' old routes from the water to the warehouses \
on the hill. In 1851 a storm destroyed half of the pier and sank eleven ships at anchor; the town rebuilt it \
within two years, longer and higher, with an iron rail for cranes along its top. The railway reached Kessel in \
1879, and with it came the cannery, which for sixty years employed nearly a third of the town. Herring were \
landed at dawn, cleaned and packed by noon, and on the evening train to the capital by six. When the herring \
vanished from the northern waters in the 1950s, the cannery closed, the railway cut its service to two trains \
a day, and the population fell from nine thousand to under four. The pier was saved by the ferry company, \
which began a summer service to the islands in 1962 and now carries some two hundred thousand passengers a \
year. The old warehouses have become a museum, a school of boat building and a row of restaurants, and the \
cannery's brick chimney, the tallest structure on the coast, is lit every night as a landmark for ships. \
The town council meets in the former salt exchange, whose hall still has the merchants' scales set into the \
floor, and every August the town holds a regatta in which crews race the old wooden herring boats from the \
pier to the lighthouse and back."""

CODE = '''import csv
from dataclasses import dataclass


@dataclass
class Order:
    customer: str
    item: str
    quantity: int
    unit_price: float


def read_orders(path):
    orders = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            orders.append(Order(row["customer"], row["item"], int(row["quantity"]), float(row["unit_price"])))
    return orders


def total_by_customer(orders):
    totals = {}
    for order in orders:
        totals[order.customer] = totals.get(order.customer, 0.0) + order.quantity * order.unit_price
    return totals


def print_report(path):
    totals = total_by_customer(read_orders(path))
    for customer, total in sorted(totals.items(), key=lambda pair: -pair[1]):
        print(f"{customer:20} {total:10.2f}")
'''

# Each a user's message, sent through the model's chat template as an application would send it (with the
# raw text as a prompt, SmolLM2-Instruct wrote its own sentences where asked to quote).
PROMPTS = {
    "repeat": ("grounded", f"Here is a text:\n\n{PASSAGE}\n\nRepeat the text above exactly, word for word."),
    "extract": ("grounded", f"{PASSAGE}\n\nCopy the sentences of this text that mention the pier, word for "
                            "word, one per line."),
    "extract years": ("grounded", f"{PASSAGE}\n\nQuote, word for word, every sentence of the text above "
                                  "that mentions a year."),
    "summarise": ("grounded", f"{PASSAGE}\n\nSummarise the text above."),
    "code edit": ("grounded", f"```python\n{CODE}```\n\nRename the class `Order` to `Purchase` everywhere in "
                              "this file and show the whole file."),
    "code hints": ("grounded", f"```python\n{CODE}```\n\nAdd type hints to every function in this file. Show "
                               "the whole file."),
    "story": ("open", "Write a short story about a girl who finds a map in her grandfather's attic."),
    "explain": ("open", "Explain, in a few paragraphs, why the sky is blue and sunsets are red."),
}


class CutToTheAnswer(NgramDrafter):
    """ngram-simple's drafts cut to the part that will be accepted (it is told the answer): the fastest
    any sizing of these drafts could decode, measured, as the ceiling beside "ngram"'s own sizing."""

    answer: ClassVar[list[int]] = []
    prompt_tokens: ClassVar[int] = 0

    def __init__(self, size_n: int, size_m: int, **_: object) -> None:
        super().__init__(size_n, size_m, sized=False)

    def draft(self, history: list[int], sampled: int, room: int) -> list[int]:
        proposed = super().draft(history, sampled, room)
        at = len(history) - self.prompt_tokens + 1  # where the first drafted token stands in the answer
        kept = 0
        while kept < len(proposed) and at + kept < len(self.answer) and proposed[kept] == self.answer[at + kept]:
            kept += 1
        return proposed[:kept]


def cut_to_the_answer(context: mullama.Context, prompt: str, tokens: int, spec: dict,
                      answer: list[int]) -> tuple[float, list[int], int, int]:
    """The ceiling: ours with ngram-simple's drafts cut to what is accepted, told ``answer``. Where its own
    batches part from that answer at a near-tie, it is told its own answer and run again (at most twice)."""
    CutToTheAnswer.prompt_tokens = len(tokenize_prompt(context.model, prompt))
    _sequence.NgramDrafter = CutToTheAnswer  # type: ignore[misc]
    try:
        for _ in range(3):
            CutToTheAnswer.answer = answer
            run = ours(context, prompt, tokens, {**spec, "speculative": "ngram-simple"})
            if run[1] == answer:
                break
            answer = run[1]
    finally:
        _sequence.NgramDrafter = NgramDrafter  # type: ignore[misc]
    return run


def ours(context: mullama.Context, prompt: str, tokens: int, spec: dict) -> tuple[float, list[int], int, int]:
    """Decode tokens/s (after the prompt), the tokens, drafted tokens proposed and accepted."""
    result = context.generate(prompt, tokens, cache_prompt=False, timeout_ms=None, **spec)
    seconds = result.timings["total_seconds"] - (result.timings["prompt_seconds"] or 0.0)
    return (len(result.token_ids) / seconds, result.token_ids, result.timings["draft_proposed"],
            result.timings["draft_accepted"])


def theirs(server: upstream.LlamaServer, prompt: str, tokens: int) -> tuple[float, list[int], int, int]:
    reply = server.greedy(prompt, tokens)
    timings = reply["timings"]
    return (timings["predicted_n"] / (timings["predicted_ms"] / 1000), reply["tokens"],
            timings.get("draft_n", 0), timings.get("draft_n_accepted", 0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--draft-min", type=int, default=4)
    parser.add_argument("--draft-max", type=int, default=16)
    parser.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                        help="flash attention for all three (upstream's -fa); on CPU, off makes verify batches cheaper")
    parser.add_argument("--llama-cpp-python", metavar="PYTHON",
                        help="an interpreter with llama-cpp-python installed: adds its plain greedy decode and its "
                             "prompt lookup (LlamaPromptLookupDecoding, its defaults) as columns")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    spec = {"speculative": "ngram", "draft_min": args.draft_min, "draft_max": args.draft_max}
    path = _pull.resolve(args.model)
    build = upstream.build_with_tools()
    server = upstream.LlamaServer(build.tool("llama-server"), path, threads=args.threads, extra=(
        "--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", str(args.draft_min),
        "--spec-ngram-simple-size-m", str(args.draft_max), "-fa", args.flash_attn))
    model = mullama.Model.load(path)
    texts = {name: model.apply_chat_template([{"role": "user", "content": ask}]) for name, (_, ask) in PROMPTS.items()}
    # llama-cpp-python's flash_attn is a bool: upstream's "auto" turns flash attention on on a CPU
    peer_job = {"model": str(path), "threads": args.threads, "n_ctx": 4096, "flash_attn": args.flash_attn != "off",
                "reps": 1, "tokens": args.tokens,
                "decode": {name: tokenize_prompt(model, text) for name, text in texts.items()}}
    peer: dict[str, dict[str, list[float]]] = {name: {"plain": [], "lookup": []} for name in PROMPTS}
    peer_same: dict[str, dict[str, bool]] = {name: {"plain": True, "lookup": True} for name in PROMPTS}
    peer_version = None
    answers: dict[str, str] = {}  # our plain answers, as text (llama-cpp-python gives text)
    columns = ("plain", "spec", "ceiling", "server")
    speeds: dict[str, dict[str, list[float]]] = {name: {column: [] for column in columns} for name in PROMPTS}
    drafts: dict[str, dict[str, tuple[int, int]]] = {}
    same: dict[str, bool] = {}
    ceiling_parted: dict[str, bool] = {}  # the ceiling's batches parted from the speculative answer at a near-tie
    try:
        with mullama.Context(model, n_ctx=4096, n_threads=args.threads, flash_attn=flash_attn_option(args)) as context:
            ours(context, "Warm up:", 8, {})
            for _ in range(args.reps):
                for name, prompt in texts.items():
                    plain = ours(context, prompt, args.tokens, {})
                    fast = ours(context, prompt, args.tokens, spec)
                    ceiling = cut_to_the_answer(context, prompt, args.tokens, spec, fast[1])
                    reference = theirs(server, prompt, args.tokens)
                    for column, run in zip(columns, (plain, fast, ceiling, reference)):
                        speeds[name][column].append(run[0])
                    same[name] = same.get(name, True) and fast[1] == reference[1]
                    answers[name] = model.detokenize(plain[1])
                    ceiling_parted[name] = ceiling_parted.get(name, False) or ceiling[1] != fast[1]
                    drafts[name] = {column: (run[2], run[3]) for column, run in zip(columns, (plain, fast, ceiling,
                                                                                             reference))}
                if args.llama_cpp_python:  # a round of theirs, plain and with prompt lookup, in its own process
                    for kind, lookup in (("plain", None), ("lookup", {"max_ngram_size": 2, "num_pred_tokens": 10})):
                        round_ = run_peer(args.llama_cpp_python, {**peer_job, "prompt_lookup": lookup})
                        peer_version = round_["version"]
                        for name, run in round_["decode"].items():
                            peer[name][kind].append(run["tokens_per_second"])
                            peer_same[name][kind] = peer_same[name][kind] and run["text"] == answers[name]
    finally:
        server.close()
        model.close()
    print(f"{args.model}, {args.threads} threads, {args.tokens} tokens, greedy, chat template, flash attention "
          f"{args.flash_attn}; ours \"ngram\" n={args.draft_min} m={args.draft_max}, llama-server ngram-simple with "
          f"the same sizes; "
          f"ceiling: ngram-simple's drafts cut to what is accepted; tok/s, median of {args.reps}")
    print(f"{'prompt':14} {'kind':8} {'plain':>6} {'spec':>6} {'ceil':>6} {'server':>6} {'spec/plain':>10} "
          f"{'ceil/plain':>10} {'spec/server':>11} {'accepted/drafted: ours':>22} {'ceiling':>9} {'server':>9} same")
    figures = {}
    for name, (kind, _) in PROMPTS.items():
        plain, fast, ceiling, reference = (statistics.median(speeds[name][column]) for column in columns)
        counts = {column: f"{accepted}/{proposed}" for column, (proposed, accepted) in drafts[name].items()}
        mark = "*" if ceiling_parted[name] else " "
        print(f"{name:14} {kind:8} {plain:6.1f} {fast:6.1f} {ceiling:5.1f}{mark} {reference:6.1f} {fast / plain:10.2f} "
              f"{ceiling / plain:10.2f} {fast / reference:11.2f} {counts['spec']:>22} {counts['ceiling']:>9} "
              f"{counts['server']:>9} {same[name]}")
        figures[name] = {"kind": kind, "plain": plain, "speculative": fast, "ceiling": ceiling,
                         "llama_server_speculative": reference, "speculative_over_plain": fast / plain,
                         "ceiling_over_plain": ceiling / plain, "speculative_over_llama_server": fast / reference,
                         "drafts": {column: {"proposed": proposed, "accepted": accepted}
                                    for column, (proposed, accepted) in drafts[name].items() if column != "plain"},
                         "same_tokens_as_llama_server": same[name], "ceiling_parted": ceiling_parted[name]}
    if any(ceiling_parted.values()):
        print("* the ceiling's batches parted from the speculative answer at a near-tie: it decoded another answer")
    if args.llama_cpp_python:
        print(f"\nllama-cpp-python {peer_version} (its own build of the same pin), same threads and attention: "
              f"plain greedy and prompt lookup (max_ngram_size 2, num_pred_tokens 10, its defaults); "
              f"tok/s, median of {args.reps}")
        print(f"{'prompt':14} {'theirs':>7} {'lookup':>7} {'lookup/theirs':>13} {'plain/theirs':>12} "
              f"{'spec/lookup':>11} our plain text: theirs, lookup")
        for name in PROMPTS:
            theirs_plain, lookup = (statistics.median(peer[name][kind]) for kind in ("plain", "lookup"))
            ours_plain, ours_fast = figures[name]["plain"], figures[name]["speculative"]
            print(f"{name:14} {theirs_plain:7.1f} {lookup:7.1f} {lookup / theirs_plain:13.2f} "
                  f"{ours_plain / theirs_plain:12.2f} {ours_fast / lookup:11.2f} {peer_same[name]['plain']!s:>6}, "
                  f"{peer_same[name]['lookup']}")
            figures[name]["llama_cpp_python"] = {
                "version": peer_version, "plain": theirs_plain, "prompt_lookup": lookup,
                "plain_over_theirs": ours_plain / theirs_plain, "speculative_over_prompt_lookup": ours_fast / lookup,
                "same_text_plain": peer_same[name]["plain"], "same_text_lookup": peer_same[name]["lookup"]}
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads, "tokens": args.tokens,
                                               "draft_min": args.draft_min, "draft_max": args.draft_max,
                                               "flash_attn": args.flash_attn,
                                               "prompts": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
