"""Greedy generation equals upstream llama.cpp token for token (reference computed live)."""

import hashlib

import pytest

import mullama

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "I love pizza 🍕 and ice cream 🍦 because",
    "東京は日本の首都です。大阪は",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
N_PREDICT = 48


def test_library_is_the_build_upstream_tools_use(build):
    """The reference is only meaningful from the same ggml build."""
    loaded = mullama.system_info()["library_path"]
    digest = hashlib.sha256(open(loaded, "rb").read()).hexdigest()
    assert digest == build.manifest["libraries"]["libllama.so.0"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_llama_server(prompt, context, model, llama_server):
    reference = llama_server.greedy(prompt, N_PREDICT)
    assert reference["tokens"], "upstream produced no tokens"

    ours = context.generate(prompt, max_tokens=N_PREDICT)
    assert ours.token_ids == reference["tokens"]  # an end-of-generation token included, as upstream
    assert ours.text == reference["content"]
    assert ours.finish_reason == ("stop" if model.is_eog(reference["tokens"][-1]) else "length")


def test_prefix_reuse_gives_the_fresh_tokens(context, model, llama_server):
    """A second prompt sharing a prefix decodes only the new part and still matches upstream."""
    first, second = PROMPTS[1], PROMPTS[1] + " there lived"
    context.generate(first, max_tokens=8)
    result = context.generate(second, max_tokens=24)
    assert result.cached_tokens > 0
    assert result.token_ids == llama_server.greedy(second, 24)["tokens"]
