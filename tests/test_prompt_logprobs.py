"""Scoring a prompt (``StreamConfig(prompt_logprobs=K)``, OpenAI's ``echo`` with ``logprobs``): each prompt
token's log-probability given those before it, as evals compute loglikelihoods. The scores equal what
generation reports for the same tokens, on a Context and on the engine, and llama-server's logprobs of its
first token after the same prefix; the server answers lm-eval's loglikelihood request (its payload,
read the way lm-eval reads it) through the official openai client."""

from __future__ import annotations

import asyncio
import math

import openai
import pytest

import mullama
from mullama import StreamConfig

PROMPT = "The capital of France is"
TOLERANCE = 1e-3  # a prompt batch and one-token steps may sum in another order


@pytest.fixture(scope="module")
def continued(model):
    """PROMPT's greedy continuation of 8 tokens, each with its logprob and the 3 most likely there."""
    with mullama.Context(model, n_ctx=1024) as context:
        stream = context.generate_stream(PROMPT, StreamConfig(max_tokens=8, temperature=0, logprobs=3))
        return list(stream)


def _close(ours, reference) -> None:
    assert ours.id == reference.id and abs(ours.logprob - reference.logprob) < TOLERANCE
    assert [top.id for top in ours.top_logprobs] == [top.id for top in reference.top_logprobs]


def test_a_scored_prompt_equals_what_generation_reported_for_its_tokens(model, context, continued):
    prompt = model.tokenize(PROMPT) + [token.id for token in continued]
    completion = context.generate(model.detokenize(prompt), max_tokens=1, prompt_logprobs=3)
    scored = completion.prompt_logprobs
    assert [token.id for token in scored] == prompt and all(token.kind == "prompt" for token in scored)
    assert scored[0].logprob is None and scored[0].top_logprobs == ()
    assert all(token.logprob <= 0 and len(token.top_logprobs) == 3 for token in scored[1:])
    assert "".join(token.text for token in scored) == model.detokenize(prompt)
    assert [token.index for token in scored] == list(range(len(prompt)))
    for ours, reference in zip(scored[len(prompt) - len(continued):], continued):
        _close(ours, reference)
    again = context.generate(model.detokenize(prompt), max_tokens=1, prompt_logprobs=3)
    assert again.cached_tokens == 0 and len(again.prompt_logprobs) == len(prompt)  # scored whole, not cached


def test_the_engine_scores_as_a_context_does_beside_other_streams(model, continued):
    prompt = model.detokenize(model.tokenize(PROMPT) + [token.id for token in continued])

    async def scores() -> tuple[list, list]:
        engine = mullama.AsyncModel(model, n_ctx=1024, parallel=2)
        try:
            busy = engine.generate("Once upon a time", max_tokens=24)
            scored = engine.generate(prompt, max_tokens=1, prompt_logprobs=3)
            other, mine = await asyncio.gather(busy, scored)
            return other.prompt_logprobs, mine.prompt_logprobs
        finally:
            await engine.aclose()

    other, mine = asyncio.run(scores())
    assert other == []  # not asked for
    with mullama.Context(model, n_ctx=1024) as context:
        reference = context.generate(prompt, max_tokens=1, prompt_logprobs=3).prompt_logprobs
    assert len(mine) == len(reference)
    for ours, theirs in zip(mine[1:], reference[1:]):
        _close(ours, theirs)


def test_each_score_equals_llama_servers_logprobs_after_the_same_prefix(model, context, llama_server):
    ids = model.tokenize("Paris is the capital and largest city of France.")
    scored = context.generate(model.detokenize(ids), max_tokens=1, prompt_logprobs=5).prompt_logprobs
    for end in range(1, len(ids)):
        answer = llama_server.post("/v1/completions", {"prompt": ids[:end], "max_tokens": 1, "temperature": 0,
                                                       "logprobs": 5, "cache_prompt": False})
        first = answer["choices"][0]["logprobs"]["content"][0]  # llama-server's shape: the chat route's
        theirs = {top["id"]: top["logprob"] for top in first["top_logprobs"]}  # the 5 most likely there
        ours = {top.id: top.logprob for top in scored[end].top_logprobs}
        assert ours.keys() == theirs.keys(), end
        assert all(abs(ours[token] - theirs[token]) < TOLERANCE for token in ours), end


def test_echo_with_logprobs_answers_lm_evals_loglikelihood_request(served, model):
    """lm-eval's local-completions: token ids of context + continuation, echo, logprobs 1, max_tokens 1;
    it sums token_logprobs[ctxlen:-1] and calls the continuation greedy when each is its top logprob."""
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    pairs = [("The capital of France is", " Paris"), ("The capital of France is", " a banana"),
             ("1, 2, 3, 4,", " 5")]
    requests = [(model.tokenize(context), model.tokenize(context + continuation)) for context, continuation in pairs]
    reply = client.completions.create(model="m", prompt=[whole for _, whole in requests], temperature=0,
                                      max_tokens=1, logprobs=1, seed=1234, echo=True)
    results = []
    for choice, (context_ids, whole) in zip(sorted(reply.choices, key=lambda c: c.index), requests):
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(whole) + 1 and logprobs.token_logprobs[0] is None
        assert logprobs.top_logprobs[0] is None and choice.text.startswith(model.detokenize(whole))
        ctxlen = len(context_ids)
        continuation = logprobs.token_logprobs[ctxlen:-1]
        greedy = all(lp == max(top.values()) for lp, top in zip(continuation, logprobs.top_logprobs[ctxlen:-1]))
        results.append((sum(continuation), greedy))
    assert results[0][0] > results[1][0] and results[0][1] and not results[1][1]
    with mullama.Context(model, n_ctx=1024) as context:
        for (total, _greedy), (context_ids, whole) in zip(results, requests):
            scored = context.generate(model.detokenize(whole), max_tokens=1, prompt_logprobs=1).prompt_logprobs
            assert math.isclose(total, sum(token.logprob for token in scored[len(context_ids):]), abs_tol=TOLERANCE)


def test_echo_streams_the_prompt_first_and_without_logprobs_too(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert whole.choices[0].text.startswith(PROMPT) and whole.choices[0].logprobs is None
    plain = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0)
    assert whole.choices[0].text == PROMPT + plain.choices[0].text
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=6, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    first = chunks[0].choices[0]
    assert first.text == PROMPT and first.logprobs.token_logprobs[0] is None
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == whole.choices[0].text
    offsets = [offset for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
               for offset in chunk.choices[0].logprobs.text_offset]
    assert offsets == sorted(offsets) and offsets[0] == 0


@pytest.mark.parametrize("value", [-1, 21, "3", True])
def test_prompt_logprobs_out_of_range_are_refused(value):
    with pytest.raises(mullama.InvalidConfigError) as refused:
        StreamConfig(prompt_logprobs=value)
    assert refused.value.field == "prompt_logprobs"
