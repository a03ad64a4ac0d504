"""Context: parameters, KV cache reuse, overflow, timeouts, one thread at a time."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from concurrently import run_in_threads

import mullama


@pytest.mark.parametrize("kwargs", [{"n_ctx": 0}, {"n_ctx": -5}, {"n_batch": 0}, {"n_threads": "two"},
                                    {"seed": -1}, {"n_ctx": 1.5}])
def test_bad_parameters(model, kwargs):
    with pytest.raises(mullama.InvalidConfigError) as info:
        mullama.Context(model, **kwargs)
    assert info.value.code == "INVALID_CONFIG"
    assert next(iter(kwargs)) in str(info.value)


@pytest.mark.parametrize("n_ctx", [1, 10, 100, 255])
def test_a_context_smaller_than_llama_cpp_makes_is_refused_as_the_cli_refuses_it(model, n_ctx):
    """llama.cpp rounds a context up to a multiple of 256: Context, AsyncModel and -c/--ctx-size refuse
    less with one rule and one message, instead of silently holding 256 tokens."""
    with pytest.raises(mullama.InvalidConfigError) as info:
        mullama.Context(model, n_ctx=n_ctx)
    message = str(info.value)
    assert info.value.code == "INVALID_CONFIG" and "n_ctx" in message and "at least 256" in message
    with pytest.raises(mullama.InvalidConfigError, match="n_ctx must be at least 256"):
        mullama.AsyncModel(model, n_ctx=n_ctx)
    cli = subprocess.run([sys.executable, "-m", "mullama", "run", "-c", str(n_ctx), "hi"], capture_output=True,
                         text=True, timeout=300, check=False)
    assert cli.returncode == 1
    assert cli.stderr.strip() == f"mullama: error [INVALID_CONFIG]: {message.replace('n_ctx', '--ctx-size')}"
    with mullama.Context(model, n_ctx=256, warmup=False) as ctx:
        assert ctx.n_ctx == 256


def test_bad_max_tokens(context):
    for value in (0, -1, 2.5, "10", True):
        with pytest.raises(mullama.InvalidConfigError):
            context.generate("hi", max_tokens=value)


def test_parameters_are_applied(model):
    with mullama.Context(model, n_ctx=1024, n_batch=256, n_threads=1) as ctx:
        assert (ctx.n_ctx, ctx.n_batch, ctx.n_threads) == (1024, 256, 1)


def test_cache_reuse_and_clear(context, model):
    first = context.generate("The quick brown fox", max_tokens=4)
    assert first.cached_tokens == 0
    prompt_tokens = model.tokenize("The quick brown fox")
    assert context.cached_tokens[: len(prompt_tokens)] == prompt_tokens
    again = context.generate("The quick brown fox", max_tokens=4)
    assert again.cached_tokens == len(prompt_tokens) - 1  # the last one is re-decoded for its logits
    assert again.token_ids == first.token_ids
    context.clear()
    assert context.cached_tokens == []
    assert context.generate("The quick brown fox", max_tokens=4).token_ids == first.token_ids


def test_prompt_longer_than_the_context(model):
    with mullama.Context(model, n_ctx=256) as ctx:  # llama.cpp rounds n_ctx up to a multiple of 256
        prompt = "word " * 400
        n_prompt = len(model.tokenize(prompt))
        with pytest.raises(mullama.ContextOverflowError) as info:
            ctx.generate(prompt, max_tokens=4)
        assert info.value.code == "CONTEXT_OVERFLOW"
        assert str(ctx.n_ctx) in str(info.value) and str(n_prompt) in str(info.value)
        assert ctx.generate("Hello", max_tokens=2).token_ids  # still usable


def test_generation_stops_when_the_context_is_full(model):
    with mullama.Context(model, n_ctx=256) as ctx:
        prompt = "Count: " + ", ".join(str(i) for i in range(1, 60))
        assert 200 < len(model.tokenize(prompt)) < 250
        result = ctx.generate(prompt, max_tokens=100)
        assert result.finish_reason == "length"
        assert len(result.token_ids) < 100
        assert len(ctx.cached_tokens) <= ctx.n_ctx


def test_prompts_longer_than_a_batch_are_decoded_in_chunks(model):
    prompt = "The history of the city " * 60  # several hundred tokens, batch of 64
    with mullama.Context(model, n_ctx=1024, n_batch=64) as small, mullama.Context(model, n_ctx=1024) as big:
        assert small.generate(prompt, 8).token_ids == big.generate(prompt, 8).token_ids


def test_deadline_aborts_a_long_prompt_and_leaves_the_context_usable(model):
    with mullama.Context(model, n_ctx=4096, n_batch=512) as ctx:
        text = "A long prompt about many things. " * 300
        prompt = model.tokenize(text)
        with pytest.raises(mullama.StreamTimeoutError) as info:
            list(ctx.generate_stream(text, max_tokens=4, timeout_ms=10))
        assert info.value.code == "STREAM_TIMEOUT" and isinstance(info.value, mullama.StreamingError)
        assert len(ctx.cached_tokens) < len(prompt)  # aborted within the prompt, between its batches
        assert ctx.generate("Hello", max_tokens=2).finish_reason in ("length", "stop")


def test_one_context_used_from_two_threads_raises(model):
    """Two threads on one Context: one of them gets a clear ContextError, nothing else breaks."""
    with mullama.Context(model, n_ctx=4096) as ctx:
        prompt = "A long prompt about many things. " * 300
        barrier = threading.Barrier(2)

        def use(i):
            text = (prompt, prompt[:200])[i]
            barrier.wait()
            for _ in range(20):  # the refused thread's ContextError ends it; so would anything else
                # no stream timeout: beside two other suites, the 2,100-token prompt once took over 30 s
                list(ctx.generate_stream(text, max_tokens=4, temperature=0, timeout_ms=None))

        errors = run_in_threads(use, 2)
        assert errors, "neither thread was refused"
        assert all(isinstance(e, mullama.ContextError) and "another thread" in str(e) for e in errors), errors
        assert ctx.generate("Hello", max_tokens=2).token_ids  # still consistent and usable


def test_context_seed_seeds_its_streams(model):
    """Context(seed=...) makes sampling reproducible; a StreamConfig's own seed wins over it."""
    def sample(context_seed=None, config_seed=None):
        options = {} if config_seed is None else {"seed": config_seed}
        with mullama.Context(model, n_ctx=512, seed=context_seed, warmup=False) as ctx:
            return tuple(ctx.generate("Tell me a story:", max_tokens=12, temperature=1.0, timeout_ms=None,
                                      **options).token_ids)

    assert sample(42) == sample(42)
    assert len({sample(42), sample(43), sample(44)}) > 1  # the seed is used, not ignored
    assert sample(42, config_seed=5) == sample(None, config_seed=5)


def test_bad_seed_and_huge_values_are_invalid_config(model):
    for options in ({"seed": 2**64}, {"n_ctx": 2**40}, {"n_threads": 2**31}, {"n_batch": -1}):
        with pytest.raises(mullama.InvalidConfigError) as info:
            mullama.Context(model, **options)
        assert next(iter(options)) in str(info.value)
