#!/usr/bin/env python3
"""llama-cpp-python as a peer in the benchmarks, run in an interpreter of its own.

llama-cpp-python ships its own build of libllama and libggml (0.3.36 vendors our pinned llama.cpp), whose
sonames are ours too: loaded into the benchmark's process, one library's calls could land in the other's ggml. So
the benchmarks start this file under the Python that has llama-cpp-python installed (``--llama-cpp-python
PYTHON``), send it one job as JSON on stdin and read the figures back as JSON on stdout:

    {"model": PATH, "threads": 2, "n_ctx": 4096, "flash_attn": true | false | null, "reps": 3,
     "prompt_lookup": null | {"max_ngram_size": 2, "num_pred_tokens": 10},
     "decode": {NAME: [TOKEN, ...], ...}, "tokens": 128,       # greedy decode speed per prompt
     "first_token": [TOKEN, ...],                             # optional: time to first token, after reset()
     "score": {NAME: TEXT, ...}}                               # optional: echo + logprobs 1 of each prompt

Decode speed is the tokens after the first over the time they took: a whole completion's time less that
of a one-token completion of the same prompt (the prompt and the first token), the median of ``reps``;
the prompt cache is reset before every run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Any


def run_peer(python: str, job: dict[str, Any]) -> dict[str, Any]:
    """Run ``job`` under ``python`` (an interpreter with llama-cpp-python) and return its figures."""
    done = subprocess.run([python, __file__], input=json.dumps(job), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llama-cpp-python peer failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def _serve(job: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    from llama_cpp import Llama

    options: dict[str, Any] = {"n_threads": job["threads"], "n_threads_batch": job["threads"],
                               "n_ctx": job.get("n_ctx", 4096), "verbose": False}
    flash = job.get("flash_attn")
    if flash is not None:
        options["flash_attn"] = flash
    if job.get("score"):  # its echo with logprobs needs every row's logits kept (else it refuses)
        options["logits_all"] = True
    lookup = job.get("prompt_lookup")
    if lookup is not None:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        options["draft_model"] = LlamaPromptLookupDecoding(**lookup)
        # A draft model makes it keep every row's logits, but it sizes that buffer by this argument: left
        # False, any prompt and answer past n_batch (512) tokens fail ("could not broadcast", 0.3.36).
        options["logits_all"] = True
    llm = Llama(job["model"], **options)
    reps, figures = job.get("reps", 3), {"version": llama_cpp.__version__}

    def completion(prompt: list[int], tokens: int) -> tuple[float, dict[str, Any]]:
        llm.reset()  # no prompt cache from the run before
        start = time.perf_counter()
        reply = llm.create_completion(prompt, max_tokens=tokens, temperature=0.0)
        return time.perf_counter() - start, reply

    decoded: dict[str, Any] = {}
    for name, prompt in job.get("decode", {}).items():
        speeds, text = [], ""
        for _ in range(reps):
            first, _ = completion(prompt, 1)  # the prompt and the first token
            whole, reply = completion(prompt, job["tokens"])
            speeds.append((reply["usage"]["completion_tokens"] - 1) / (whole - first))
            text = reply["choices"][0]["text"]
        decoded[name] = {"tokens_per_second": statistics.median(speeds), "text": text}
    figures["decode"] = decoded

    if job.get("first_token"):
        times = []
        for _ in range(max(reps, 10)):
            llm.reset()
            start = time.perf_counter()
            next(iter(llm.create_completion(job["first_token"], max_tokens=1, temperature=0.0, stream=True)))
            times.append(time.perf_counter() - start)
        figures["first_token_seconds"] = statistics.median(times)

    scored: dict[str, Any] = {}
    for name, prompt in job.get("score", {}).items():  # lm-eval's loglikelihood request, as it makes it
        times, logprobs = [], []
        for _ in range(reps):
            llm.reset()
            start = time.perf_counter()
            reply = llm.create_completion(prompt, max_tokens=1, temperature=0.0, echo=True, logprobs=1)
            times.append(time.perf_counter() - start)
            n_prompt = len(llm.tokenize(prompt.encode("utf-8")))  # the prompt's (a generated one may follow)
            logprobs = [None if lp is None else float(lp)  # numpy floats: as JSON numbers
                        for lp in reply["choices"][0]["logprobs"]["token_logprobs"][:n_prompt]]
        scored[name] = {"seconds": statistics.median(times), "token_logprobs": logprobs}
    figures["score"] = scored
    return figures


if __name__ == "__main__":
    json.dump(_serve(json.load(sys.stdin)), sys.stdout)
