"""The host-memory prompt cache (llama-server's --cache-ram): a prompt that another request pushed out
of the only sequence is restored from host memory instead of being decoded again, and what follows is
what the sequence would have produced had it kept the prompt — and what llama-server produces with
its own cache on the same requests."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest
import upstream
from inprocess_server import serving

import mullama
from mullama.generate._context import default_threads
from mullama.generate._engine import Engine
from mullama.generate._prompt_cache import MIB
from mullama.hub import _pull

SYSTEM = "You are a careful assistant who answers in one short line. " * 30  # ~360 tokens
FIRST = SYSTEM + "Question: what is 2+2?"
OTHER = "Tell me a story about a fox."
AGAIN = SYSTEM + "Question: name a colour."


def greedy(engine: Engine, prompt: str, n: int = 12) -> tuple[list[int], int]:
    """Greedy token ids of ``prompt`` on ``engine``, and how many prompt tokens it reused."""
    request = engine.submit(engine.model.tokenize(prompt), mullama.StreamConfig(max_tokens=n, temperature=0))

    async def read() -> list[int]:
        ids = []
        while (token := await request.next_token()) is not None:
            ids.append(token.id)
        return ids

    ids = asyncio.run(read())
    assert request.finish_reason in ("stop", "length"), request.error
    return ids, request.cached_tokens


@pytest.fixture(scope="module")
def one_slot(model):
    engine = Engine(model, parallel=1, n_ctx=2048)
    yield engine
    engine.close()


def test_a_prompt_pushed_out_of_the_only_slot_is_restored_not_decoded_again(one_slot, model):
    greedy(one_slot, FIRST)
    greedy(one_slot, OTHER)  # the slot now holds another prompt: FIRST went to host memory
    cache = one_slot.prompt_cache
    assert cache is not None and len(cache) == 1
    ids, cached = greedy(one_slot, AGAIN)
    shared = mullama.generate._context_params.common_prefix(model.tokenize(FIRST), model.tokenize(AGAIN))
    assert cached == shared > 300
    assert cache.stats["restored"] == 1 and cache.stats["restored_tokens"] == shared

    # The same as the slot would have given had it kept FIRST (no host cache, nothing in between)...
    with Engine(model, parallel=1, n_ctx=2048, cache_ram_mib=0) as kept:
        greedy(kept, FIRST)
        kept_ids, kept_cached = greedy(kept, AGAIN)
    assert kept_cached == shared
    assert ids == kept_ids


def test_the_same_requests_give_what_llama_server_gives_with_its_cache(build, model_path, model):
    """llama-server -np 1 with its default --cache-ram, cache_prompt true, the same three requests."""
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(), n_ctx=2048)
    try:
        theirs = [server.greedy(prompt, 12, cache_prompt=True)["tokens"] for prompt in (FIRST, OTHER, AGAIN)]
    finally:
        server.close()
    with Engine(model, parallel=1, n_ctx=2048) as engine:
        ours = [greedy(engine, prompt)[0] for prompt in (FIRST, OTHER, AGAIN)]
        assert engine.prompt_cache is not None and engine.prompt_cache.stats["restored"] == 1
    assert ours == theirs


def test_a_prompt_another_slot_is_answering_is_copied_from_it(model):
    """Two requests sharing a long system prompt arrive together: the one that lands on the empty slot
    copies the shared part from the other slot instead of decoding it again."""
    third = SYSTEM + "Question: what is the capital of France?"
    with Engine(model, parallel=2, n_ctx=2048) as engine:
        greedy(engine, SYSTEM.rstrip(), 1)  # one slot holds the system prompt alone: nothing goes to host memory
        requests = [engine.submit(model.tokenize(prompt), mullama.StreamConfig(max_tokens=12, temperature=0))
                    for prompt in (AGAIN, third)]

        async def read(request) -> list[int]:
            return [token.id async for token in _tokens(request)]

        async def both():
            return await asyncio.gather(*(read(request) for request in requests))

        ids = asyncio.run(both())
        cache = engine.prompt_cache
        assert cache is not None and cache.stats["copied"] == 1 and cache.stats["saved"] == 0
    shared = len(model.tokenize(SYSTEM.rstrip()))
    assert requests[0].cached_tokens == shared
    assert requests[1].cached_tokens >= shared  # maybe more: "Question:" may be decoded in the other slot by then
    # Both answers are decoded in batches shared with the other stream, which (as with llama-server -np 2)
    # may change the last bits of a logit against a lone decode: exactness of a restored state is tested
    # above with one slot; here each answer must be a real one.
    for got, request in zip(ids, requests):
        assert got and request.finish_reason in ("stop", "length")


async def _tokens(request):
    while (token := await request.next_token()) is not None:
        yield token


def test_without_the_cache_the_pushed_out_prompt_is_decoded_again(model):
    with Engine(model, parallel=1, n_ctx=2048, cache_ram_mib=0) as engine:
        assert engine.prompt_cache is None
        greedy(engine, FIRST)
        greedy(engine, OTHER)
        assert greedy(engine, AGAIN)[1] == 0


def test_the_cache_stays_within_its_budget_dropping_the_oldest(model):
    prompts = [f"Topic number {i}. " * 40 + "Say something." for i in range(4)]
    with Engine(model, parallel=1, n_ctx=2048, cache_ram_mib=1) as engine:
        cache = engine.prompt_cache
        assert cache is not None
        for prompt in prompts:
            greedy(engine, prompt, 2)
        # Each state is ~205 tokens of KV (4.5 MiB on SmolLM2): larger than 1 MiB alone, so none is kept.
        assert len(cache) == 0 and cache.size_bytes == 0
    with Engine(model, parallel=1, n_ctx=2048, cache_ram_mib=10) as engine:
        cache = engine.prompt_cache
        assert cache is not None
        for prompt in prompts:
            greedy(engine, prompt, 2)
        assert 0 < cache.size_bytes <= 10 * MIB
        assert cache.stats["saved"] == 3 and cache.stats["evicted"] == 1 and len(cache) == 2  # the oldest went
        # The newest saved one is still there and is restored for its prompt; the oldest is decoded again.
        assert greedy(engine, prompts[2], 2)[1] > 200
        assert greedy(engine, prompts[0], 2)[1] < 10  # only "Topic number" is shared with what the slot holds


def test_a_prompt_contained_in_another_entry_is_not_kept_twice(model):
    with Engine(model, parallel=1, n_ctx=2048) as engine:
        cache = engine.prompt_cache
        assert cache is not None
        greedy(engine, FIRST, 2)
        greedy(engine, OTHER, 2)  # FIRST (+2 tokens) saved
        greedy(engine, FIRST, 2)  # restored from the cache: it leaves the cache
        assert len(cache) == 1  # OTHER's state, saved when the slot went back to FIRST
        greedy(engine, OTHER, 2)  # OTHER restored, FIRST saved again
        assert len(cache) == 1 and cache.stats["restored"] == 2


@pytest.mark.parametrize("bad", [-2, 1.5, True, "8192"])
def test_a_bad_budget_is_a_clear_error(model, bad):
    with pytest.raises(mullama.InvalidConfigError, match="cache_ram_mib") as info:
        Engine(model, parallel=1, cache_ram_mib=bad)
    assert info.value.code == "INVALID_CONFIG"


def test_a_model_whose_cache_cannot_be_cut_back_has_no_host_cache():
    """Gemma 3's sliding-window cache keeps only the window: a saved state could not be trimmed to a
    shorter prefix (llama-server keeps checkpoints for it; we keep nothing rather than wrong cells)."""
    gemma = mullama.Model.load(_pull.resolve("gemma3:270m"))
    try:
        assert gemma.needs_checkpoints
        with Engine(gemma, parallel=1, n_ctx=1024) as engine:
            assert engine.prompt_cache is None
    finally:
        gemma.close()


def test_the_server_restores_a_pushed_out_prompt_and_says_so_in_usage(model):
    with serving(model, parallel=1, n_ctx=2048, cache_ram_mib=64) as (server, engine):
        def complete(prompt: str) -> dict:
            body = json.dumps({"model": "smollm2:135m", "prompt": prompt, "max_tokens": 4, "temperature": 0})
            request = urllib.request.Request(f"{server.url}/v1/completions", data=body.encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.loads(response.read())

        complete(FIRST)
        complete(OTHER)
        answer = complete(AGAIN)
    assert engine.prompt_cache is not None and engine.prompt_cache.stats["restored"] == 1
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] > 300
