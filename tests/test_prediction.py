"""Predicted outputs (OpenAI's ``prediction``, ``StreamConfig.prediction``): text the answer is expected to
repeat, where n-gram drafts are looked up too. The answer is the one decoding without it gives (but at a
near-tie, as with any speculation: test_speculative), sooner; the server reports OpenAI's accepted and
rejected prediction tokens. On both test models, in a Context, the engine and the server."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from inprocess_server import serving
from test_speculative import N_PREDICT, assert_same_but_near_ties, stream

import mullama
from mullama.generate._speculative import NgramDrafter
from mullama.hub import _pull

# Answers that are not in their prompts: asked again, the earlier answer is the prediction.
PROMPT = "Once upon a time, in a small village by the sea,"
QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@pytest.fixture(scope="module", params=["smollm2:135m", "gemma3:270m"])
def loaded(request):
    with mullama.Model.load(_pull.resolve(request.param)) as model:
        yield model


def test_the_drafter_looks_the_n_gram_up_in_the_reference_too():
    """A match in the reference drafts what follows it there, never past its end; a later match in the
    context is preferred, as upstream prefers the most recent occurrence."""
    reference = [50, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    drafter = NgramDrafter(3, 4, sized=False, reference=reference)
    assert drafter.draft([60, 1, 2], 3, room=16) == [4, 5, 6, 7]  # a context too short to search alone
    assert NgramDrafter(3, 4, sized=False).draft([60, 1, 2], 3, room=16) == []
    assert NgramDrafter(3, 8, sized=False, reference=reference).draft([60, 1, 2], 3, room=16) == [4, 5, 6, 7, 8, 9]
    context = [60, 1, 2, 3, 11, 12, 13, 14, 15, 1, 2]
    assert drafter.draft(context, 3, room=16) == [11, 12, 13, 14]


def test_a_prediction_gives_the_same_answer_sooner(loaded):
    """The earlier answer as the prediction: the same tokens (or parted at a near-tie), most of them
    accepted from drafts; a prediction that shares nothing with the answer changes nothing either."""
    plain, _ = stream(loaded, PROMPT)
    text = "".join(token.text for token in plain)
    predicted, fast = stream(loaded, PROMPT, prediction=text)
    assert_same_but_near_ties([token.id for token in predicted], plain)
    if [token.id for token in predicted] == [token.id for token in plain]:
        assert fast.draft_accepted > N_PREDICT // 2 and fast.draft_accepted > fast.draft_proposed // 2
    unrelated, _ = stream(loaded, PROMPT, prediction="0123456789 " * 20)
    assert_same_but_near_ties([token.id for token in unrelated], plain)


def test_seeded_sampling_is_the_same_with_a_prediction(model):
    """Each drafted position is sampled with the stream's own sampler (upstream's rule): with a seed, the
    same tokens as without the prediction."""
    options = {"max_tokens": N_PREDICT, "temperature": 0.8, "top_p": 0.95, "seed": 7, "cache_prompt": False}
    with mullama.Context(model, n_ctx=2048) as context:
        plain = context.generate(PROMPT, **options)
        fast = context.generate(PROMPT, **options, prediction=plain.text)
    assert fast.token_ids == plain.token_ids and fast.timings["draft_accepted"] > 0


def test_an_async_stream_with_a_prediction_is_a_contexts(model):
    """The engine drafts from the prediction as a Context does: the same tokens and drafts."""
    with mullama.Context(model, n_ctx=2048) as context:
        plain = context.generate(PROMPT, max_tokens=N_PREDICT, temperature=0, cache_prompt=False)
        expected = context.generate(PROMPT, max_tokens=N_PREDICT, temperature=0, cache_prompt=False,
                                    prediction=plain.text)

    async def run() -> tuple[list[int], int]:
        async_model = mullama.AsyncModel(model, n_ctx=2048, parallel=2)
        try:
            tokens = async_model.generate_stream(PROMPT, max_tokens=N_PREDICT, temperature=0, cache_prompt=False,
                                                 prediction=plain.text)
            return [token.id async for token in tokens], tokens.draft_accepted
        finally:
            await async_model.aclose()

    ids, accepted = asyncio.run(run())
    assert ids == expected.token_ids and accepted == expected.timings["draft_accepted"] > 0


def test_the_server_takes_openais_prediction_and_reports_its_tokens(model):
    """``prediction`` on /v1/chat/completions (the openai SDK's argument): the same message, and usage's
    ``completion_tokens_details`` with the accepted and rejected prediction tokens, streamed or not. A
    request without one has no such details; a malformed one is a 400 naming it."""
    with serving(model, parallel=1, n_ctx=2048) as (server, _):
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        request = {"model": "m", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": N_PREDICT,
                   "temperature": 0, "extra_body": {"cache_prompt": False}}
        plain = client.chat.completions.create(**request)
        assert plain.usage.completion_tokens_details is None
        empty = client.chat.completions.create(**request, prediction={"type": "content", "content": ""})
        assert empty.usage.completion_tokens_details is None  # an empty prediction predicts nothing
        text = plain.choices[0].message.content
        for prediction in ({"type": "content", "content": text},
                           {"type": "content", "content": [{"type": "text", "text": text}]}):
            answer = client.chat.completions.create(**request, prediction=prediction)
            assert answer.choices[0].message.content == text
            details = answer.usage.completion_tokens_details
            assert details.accepted_prediction_tokens > N_PREDICT // 2
            assert details.rejected_prediction_tokens >= 0
        chunks = list(client.chat.completions.create(**request, prediction={"type": "content", "content": text},
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == text
        assert chunks[-1].usage.completion_tokens_details.accepted_prediction_tokens == \
            details.accepted_prediction_tokens
        for bad in ({"type": "content"}, {"type": "file", "content": "x"}, "text"):
            refused = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "prediction": bad})
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "prediction"
