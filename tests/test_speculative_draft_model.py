"""Speculative decoding with a draft model (``Context(model, draft_model=...)``, ``speculative="draft"``):
the draft model proposes, the target verifies, so the output is the target's own; a draft model must
share the target's vocabulary; the engine gives each slot a context of the draft model. The test draft
model is SmolLM2 requantised to Q2_K by tools/make_draft_model.py (conftest's ``draft_model``)."""

from __future__ import annotations

import asyncio

import pytest
from test_speculative import N_PREDICT, OPEN

import mullama
from mullama.generate._engine import Engine
from mullama.generate._model import tokenize_prompt
from mullama.hub import _pull


@pytest.mark.parametrize("prompt", OPEN)
def test_a_draft_model_drafts_and_the_output_is_the_targets(prompt, model, draft_model):
    with mullama.Context(model, n_ctx=2048, draft_model=draft_model) as context:
        plain = context.generate(prompt, N_PREDICT, cache_prompt=False, timeout_ms=None)
        fast = context.generate(prompt, N_PREDICT, cache_prompt=False, timeout_ms=None, speculative="draft",
                                draft_max=4)
    assert fast.token_ids == plain.token_ids
    assert fast.timings["draft_proposed"] >= fast.timings["draft_accepted"] > 0


def test_a_draft_model_must_share_the_vocabulary(model):
    with mullama.Model.load(_pull.resolve("gemma3:270m")) as other:
        with pytest.raises(mullama.InvalidConfigError, match="cannot draft for") as caught:
            mullama.Context(model, draft_model=other)
        with pytest.raises(mullama.InvalidConfigError, match="cannot draft for"):
            mullama.Context(other, draft_model=model)
        # the refused Contexts left nothing open on either model, though `caught` holds a traceback
        # (closing `other` here raised ContextError: a context still used it)
    assert caught.value.code == "INVALID_CONFIG"


def test_draft_speculation_needs_a_draft_model(model):
    with mullama.Context(model, n_ctx=512) as context:
        with pytest.raises(mullama.InvalidConfigError, match="draft_model="):
            context.generate("Hi", 4, speculative="draft")
    engine = Engine(model, parallel=1, n_ctx=512)
    try:
        with pytest.raises(mullama.InvalidConfigError, match="draft_model="):
            engine.submit(tokenize_prompt(model, "Hi"), mullama.StreamConfig(speculative="draft"))
    finally:
        engine.close()


def test_async_streams_draft_with_a_draft_model(model, model_path, draft_model):
    """AsyncModel.load(path, draft_model=...): each slot of the engine has its own context of the draft
    model; two streams draft side by side, and each gives the target's own answer."""
    loaded = asyncio.run(mullama.AsyncModel.load(model_path, n_ctx=1024, parallel=2, draft_model=draft_model.path))

    async def one(prompt):
        stream = loaded.generate_stream(prompt, max_tokens=32, temperature=0, timeout_ms=None, cache_prompt=False,
                                        speculative="draft", draft_max=4)
        return [token.id async for token in stream], stream.draft_accepted

    async def both():
        return await asyncio.gather(*(one(prompt) for prompt in OPEN[:2]))

    try:
        results = asyncio.run(both())
    finally:
        asyncio.run(loaded.aclose())
    with mullama.Context(model, n_ctx=1024) as context:
        for prompt, (ids, accepted) in zip(OPEN[:2], results):
            assert ids == context.generate(prompt, 32, cache_prompt=False, timeout_ms=None).token_ids
            assert accepted > 0
