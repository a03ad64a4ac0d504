#!/usr/bin/env python3
"""Images in: the projector's encode time and an image prompt's time, ours beside llama-server --mmproj,
and four concurrent image requests against one.

On the same model, projector (written by tools/make_test_mmproj.py: random weights, real shapes) and
image (the pinned tree's tools/mtmd/test-1.jpeg), rounds interleaved:

- encode: libmtmd's own "image slice encoded in N ms" line, from our log and from llama-server's;
- image prompt: from the request until the prompt (the image's embeddings and the text) is in the KV
  cache: our ``prompt_seconds`` (JPEG decode and preprocessing included) against llama-server's
  ``prompt_ms`` (which starts after it has decoded and preprocessed the image);
- batching: 1 and 4 concurrent image requests of ``--tokens`` tokens through ``AsyncModel`` (the
  batching engine), each with another question so nothing is reused; aggregate tokens/s over the wall
  time, and the same against llama-server ``-np 4``.

Greedy answers are compared with llama-server's on every round. Figures are medians over ``--reps``.

    python benchmarks/bench_vision.py [--model smollm2:135m] [--image-size 224] [--patch-size 14]
                                      [--encoder 768,12,3072,12] [--reps 5] [--tokens 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_server  # noqa: F401  (puts tests/ on sys.path for upstream)
import upstream

import mullama
from mullama.chat._media_parts import split_media
from mullama.generate._context import default_threads
from mullama.hub import _pull

REPO = HERE.parent
MARKER = "<__bench_media__>"  # llama-server's media marker, pinned for /completion prompts
ENCODED = re.compile(r"image slice encoded in (\d+) ms")
DECODED = re.compile(r"image decoded \(batch \d+/\d+\) in (\d+) ms")
QUESTIONS = ("What is in this image?", "Describe the picture.", "Which colours do you see?",
             "Is there a person in it?")


class MediaTimes(logging.Handler):
    """Collects libmtmd's encode and embeddings-decode times (ms) from the ``mullama.llama_cpp`` log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.encode: list[int] = []
        self.decode: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        for pattern, into in ((ENCODED, self.encode), (DECODED, self.decode)):
            match = pattern.search(message)
            if match:
                into.append(int(match.group(1)))


def messages(image_uri: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": image_uri}}]}]


def ours(context: mullama.Context, image_uri: str, question: str, tokens: int) -> tuple[float, float, list[int]]:
    """Our time to the first token, the prompt's seconds (the image's JPEG decode and preprocessing
    included) and the greedy answer's tokens."""
    stream = context.chat_stream(messages(image_uri, question), max_tokens=tokens, temperature=0,
                                 cache_prompt=False, timeout_ms=None)
    ids = [token.id for token in stream]
    first, seconds = stream.time_to_first_token(), stream.prompt_seconds()
    assert first is not None and seconds is not None
    return first, seconds, ids


def theirs(server: upstream.LlamaServer, model: mullama.Model, image: bytes, question: str,
           tokens: int) -> tuple[float, float, list[int]]:
    """llama-server's time to the first streamed token (seen by its client: the request's JPEG
    decode and preprocessing included, as in ours), its own ``prompt_ms`` (which starts after them),
    and its answer's tokens."""
    marked, _ = split_media(messages("x", question), MARKER)
    prompt = model.apply_chat_template(marked, add_generation_prompt=True)
    body = json.dumps({
        "prompt": {"prompt_string": prompt, "multimodal_data": [base64.b64encode(image).decode()]},
        "n_predict": tokens, "temperature": 0.0, "top_k": 1, "samplers": ["top_k", "temperature"],
        "cache_prompt": False, "return_tokens": True, "stream": True})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    began = time.perf_counter()
    connection.request("POST", "/completion", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    first, ids, timings = None, [], {}
    for line in response:
        if not line.startswith(b"data: "):
            continue
        chunk = json.loads(line[6:])
        if first is None:
            first = time.perf_counter() - began
        ids.extend(chunk.get("tokens", []))
        timings = chunk.get("timings", timings)
    connection.close()
    assert first is not None
    return first, timings["prompt_ms"] / 1000, ids


async def our_batch(model: mullama.AsyncModel, image_uri: str, clients: int, tokens: int) -> float:
    """Aggregate tokens/s of ``clients`` concurrent image requests through the engine."""
    async def one(question: str) -> int:
        stream = model.chat_stream(messages(image_uri, question), max_tokens=tokens, temperature=0,
                                   ignore_eos=True, cache_prompt=False, timeout_ms=None)
        return len([token async for token in stream])

    began = time.perf_counter()
    counts = await asyncio.gather(*(one(QUESTIONS[n % len(QUESTIONS)]) for n in range(clients)))
    return sum(counts) / (time.perf_counter() - began)


def their_batch(server: upstream.LlamaServer, model: mullama.Model, image: bytes, clients: int,
                tokens: int) -> float:
    """Aggregate tokens/s of ``clients`` concurrent image requests to llama-server."""
    def one(question: str) -> int:
        marked, _ = split_media(messages("x", question), MARKER)
        prompt = model.apply_chat_template(marked, add_generation_prompt=True)
        reply = server.post("/completion", {
            "prompt": {"prompt_string": prompt, "multimodal_data": [base64.b64encode(image).decode()]},
            "n_predict": tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": True, "cache_prompt": False})
        return int(reply["timings"]["predicted_n"])

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(one, [QUESTIONS[n % len(QUESTIONS)] for n in range(clients)]))
    return sum(counts) / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2:135m")
    parser.add_argument("--image-size", type=int, default=224, help="the projector's image side (pixels)")
    parser.add_argument("--patch-size", type=int, default=14, help="pixels per patch side")
    parser.add_argument("--encoder", default="768,12,3072,12", help="the projector's encoder: width, heads, "
                        "feed-forward width, blocks (default a CLIP ViT-B's)")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    path = _pull.resolve(args.model)
    build = upstream.build_with_tools()
    image = (Path(build.manifest["source"]) / "tools" / "mtmd" / "test-1.jpeg").read_bytes()
    image_uri = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    workdir = tempfile.TemporaryDirectory(prefix="bench-vision-")
    mmproj = Path(workdir.name) / "mmproj.gguf"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_test_mmproj.py"), str(mmproj), "--for", str(path),
                    "--image-size", str(args.image_size), "--patch-size", str(args.patch_size),
                    *(option for pair in zip(("--encoder-width", "--encoder-heads", "--encoder-ff", "--encoder-blocks"),
                                             args.encoder.split(","), strict=True) for option in pair)], check=True)
    os.environ["LLAMA_MEDIA_MARKER"] = MARKER
    server = upstream.LlamaServer(build.tool("llama-server"), path, threads=args.threads, n_ctx=4 * 2048,
                                  parallel=4, extra=("--mmproj", str(mmproj)))
    handler = MediaTimes()
    logger = logging.getLogger("mullama.llama_cpp")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    model = mullama.Model.load(path, mmproj=mmproj)
    first: dict[str, list[float]] = {"ours": [], "server": []}
    prompt_s: dict[str, list[float]] = {"ours": [], "server": []}
    batch: dict[str, dict[int, list[float]]] = {"ours": {1: [], 4: []}, "server": {1: [], 4: []}}
    same = True
    try:
        with mullama.Context(model, n_ctx=2048, n_threads=args.threads) as context:
            ours(context, image_uri, "Warm up.", 2)
            theirs(server, model, image, "Warm up.", 2)
            handler.encode.clear()
            handler.decode.clear()
            for rep in range(args.reps):
                question = QUESTIONS[rep % len(QUESTIONS)]
                mine = ours(context, image_uri, question, args.tokens)
                reference = theirs(server, model, image, question, args.tokens)
                for who, result in (("ours", mine), ("server", reference)):
                    first[who].append(result[0])
                    prompt_s[who].append(result[1])
                same = same and mine[2] == reference[2]
        logger.removeHandler(handler)

        async def batches() -> None:
            engine = mullama.AsyncModel(model, parallel=4, n_ctx=2048, n_threads=args.threads)
            try:
                await our_batch(engine, image_uri, 1, 2)
                for _ in range(args.reps):
                    for clients in (1, 4):
                        batch["ours"][clients].append(await our_batch(engine, image_uri, clients, args.tokens))
                        batch["server"][clients].append(
                            await asyncio.to_thread(their_batch, server, model, image, clients, args.tokens))
            finally:
                await engine.aclose()

        asyncio.run(batches())
    finally:
        server.close()
        model.close()
        workdir.cleanup()
    side = args.image_size // args.patch_size
    median = statistics.median
    print(f"{args.model}, {args.threads} threads, projector {args.image_size}px / {args.patch_size}px patches "
          f"({side * side} embeddings per image), encoder {args.encoder} (width, heads, ff, blocks), "
          f"{args.tokens} tokens, median of {args.reps}")
    print(f"{'':28} {'ours':>9} {'server':>9} {'ours/server':>11}")
    figures: dict = {"same_tokens_as_llama_server": same, "aggregate_tokens_per_second": {}}
    for name, key, values in (("time to first token (ms)", "time_to_first_token_ms", first),
                              ("image prompt (ms)", "prompt_ms", prompt_s)):
        mine, reference = median(values["ours"]) * 1000, median(values["server"]) * 1000
        print(f"{name:28} {mine:9.1f} {reference:9.1f} {mine / reference:11.2f}")
        figures[key] = {"ours": mine, "llama_server": reference}
    encode, decode = median(handler.encode or [0]), median(handler.decode or [0])
    print(f"{'  of ours: encode (ms)':28} {encode:9.1f}   (libmtmd's log; llama-server logs no encode time)")
    print(f"{'  of ours: decode image (ms)':28} {decode:9.1f}")
    figures["ours_encode_ms"], figures["ours_image_decode_ms"] = encode, decode
    for who in ("ours", "server"):
        one, four = median(batch[who][1]), median(batch[who][4])
        print(f"{who + ': 1 and 4 requests, tok/s':28} {one:9.1f} {four:9.1f} {four / one:10.2f}x")
        figures["aggregate_tokens_per_second"][who] = {"1": one, "4": four, "4_over_1": four / one}
    print(f"greedy answers equal llama-server's: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "threads": args.threads, "tokens": args.tokens,
                                               "image_size": args.image_size, "patch_size": args.patch_size,
                                               "encoder": args.encoder, "reps": args.reps, **figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
