#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU and the CUDA toolkit (none of the project's CI machines
# has one): build llama.cpp with CUDA, then
#   1. greedy parity: mullama with every layer on the GPU (-ngl 99) against upstream llama-server
#      -ngl 99 from the same build, token for token, on the default model;
#   2. decode speed: mullama's tokens/s against llama-bench -ngl 99 (tg128), side by side.
# Usage: tools/gpu_check.sh [MODEL]     (BACKEND=vulkan for Vulkan instead of CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-smollm2:135m}"
BACKEND="${BACKEND:-cuda}"

python build_llama.py "--$BACKEND" --tools llama-server,llama-bench
LIB_DIR="$(python build_llama.py "--$BACKEND" --print-path)"
export MULLAMA_LIBRARY_PATH="$LIB_DIR"
BIN_DIR="$(dirname "$LIB_DIR")/bin"
python -m pip install -q ".[test]"

python - "$MODEL" "$BIN_DIR" <<'PY'
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, "tests")
import upstream

import mullama
from mullama import _hub

model_ref, bin_dir = sys.argv[1], Path(sys.argv[2])
path = _hub.resolve(model_ref)
devices = [d for d in mullama.system_info()["devices"] if d["type"] in ("gpu", "igpu")]
if not devices:
    sys.exit("no GPU device: is the driver installed, and did the build find the toolkit?")
print("devices:", ", ".join(f"{d['name']} ({d['description']})" for d in devices))

prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,"]
server = upstream.LlamaServer(bin_dir / "llama-server", path, threads=4, extra=("-ngl", "99"))
try:
    references = [server.greedy(p, 64) for p in prompts]
finally:
    server.close()
with mullama.Model.load(path, n_gpu_layers=99) as model, mullama.Context(model, n_ctx=4096) as context:
    equal = 0
    for prompt, reference in zip(prompts, references):
        context.clear()
        ours = context.generate(prompt, max_tokens=64, cache_prompt=False)
        equal += ours.token_ids == reference["tokens"]
    print(f"greedy parity with llama-server -ngl 99: {equal}/{len(prompts)} prompts token for token")
    rates = []
    for _ in range(5):
        context.clear()
        started = time.perf_counter()
        result = context.generate("Tell me a story:", max_tokens=128, ignore_eos=True, temperature=0)
        rates.append(len(result.token_ids) / (time.perf_counter() - started))
ours_tps = statistics.median(rates)
bench = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(path), "-ngl", "99", "-p", "0", "-n", "128",
                        "-o", "json"], capture_output=True, text=True, check=True)
theirs_tps = json.loads(bench.stdout)[0]["avg_ts"]
print(f"decode: mullama {ours_tps:.1f} tok/s, llama-bench {theirs_tps:.1f} tok/s, ratio {ours_tps / theirs_tps:.3f}")
sys.exit(0 if equal == len(prompts) else 1)
PY
