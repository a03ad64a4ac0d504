"""Infill (fill-in-the-middle) against upstream: greedy ``Context.infill``, ``AsyncModel.infill`` and our
``POST /infill`` equal llama-server's ``/infill`` token for token, on a real model with FIM tokens.

No small model in the cache has FIM tokens, so ``tools/make_fim_model.py`` writes a copy of SmolLM2
naming some of its control tokens as the FIM ones (as upstream's tests craft their models); both
servers and the Python API load that same file. llama-server runs with a small batch (``-b 256``) and
context (``-c 1024``) so that the prefix, suffix and extra-chunk budgets of its prompt cut the long
cases; ours use the same sizes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import upstream
from inprocess_server import serving

import mullama
from mullama.generate._context import default_threads
from mullama.generate._infill import infill_prompt

REPO = Path(__file__).resolve().parent.parent
N_CTX, N_BATCH, N_PREDICT = 1024, 256, 24

CODE = "def fibonacci(n):\n    \"\"\"The n-th Fibonacci number.\"\"\"\n"
LONG_PREFIX = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n\n" for i in range(40))  # > 3/4 batch
LONG_SUFFIX = "".join(f"assert f{i}(1) == {1 + i + i * i}\n" for i in range(30))  # > batch/4
UTIL = {"filename": "util.py", "text": "def square(x):\n    return x * x\n"}
README = {"filename": "README.md", "text": "# Fibonacci\n\nA tiny example of fill-in-the-middle.\n"}
HUGE = {"filename": "big.py", "text": "".join(f"VALUE_{i} = {i * 7919 % 1000}\n" for i in range(150))}

# (prefix, suffix, extra, prompt, ban_eog): each llama-server request, and ours, built from it; ban_eog
# bans every end-of-generation token (logit_bias), so that the answer has all N_PREDICT tokens
CASES = {
    "plain": (CODE, "\n\nprint(fibonacci(10))\n", [], "", False),
    "extra-and-prompt": (CODE, "\n\nprint(fibonacci(10))\n", [UTIL, README], "    if n < 2:", True),
    "long-prefix-and-suffix": (LONG_PREFIX + CODE, "\n" + LONG_SUFFIX, [UTIL], "", True),
    "extra-over-budget": ("x = ", "\nprint(x)\n", [README, HUGE], "", True),
    "no-filename": ("a = [1, 2, 3]\n", "\nprint(total)\n", [{"text": "total = 0\n"}], "total =", True),
    "mixed-tokens": (["def double(x):", 198, "    return"], ["\n", 198, "print(double(4))"], [], "", True),
}
SPM_CASES = ("plain", "extra-and-prompt")  # also asked of llama-server --spm-infill (suffix first)


EOG: list[int] = []  # the FIM model's end-of-generation tokens (filled by the fim_model fixture)


def _upstream_body(case: tuple, *, stream: bool = False) -> dict:
    prefix, suffix, extra, prompt, ban_eog = case
    return {"input_prefix": prefix, "input_suffix": suffix, "input_extra": extra, "prompt": prompt,
            "n_predict": N_PREDICT, "temperature": 0.0, "top_k": 1, "cache_prompt": False, "return_tokens": True,
            "samplers": ["top_k", "temperature"], "logit_bias": [[token, False] for token in EOG] if ban_eog else [],
            "stream": stream}


@pytest.fixture(scope="module")
def fim_path(tmp_path_factory, model_path):
    """The FIM copy of SmolLM2, written by the real tool."""
    out = tmp_path_factory.mktemp("fim") / "smollm2-fim.gguf"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_fim_model.py"), str(out), str(model_path)],
                   check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def fim_model(fim_path):
    with mullama.Model.load(fim_path) as loaded:
        EOG[:] = [token for token in range(loaded.vocab_size) if loaded.is_eog(token)]
        yield loaded


@pytest.fixture(scope="module")
def reference(build, fim_path, fim_model):
    """llama-server's greedy /infill answer for every case (then the server stops)."""
    server = upstream.LlamaServer(build.tool("llama-server"), fim_path, threads=default_threads(), n_ctx=N_CTX,
                                  extra=("-b", str(N_BATCH)))
    try:
        yield {name: server.post("/infill", _upstream_body(case)) for name, case in CASES.items()}
    finally:
        server.close()


@pytest.fixture(scope="module")
def spm_reference(build, fim_path, fim_model):
    """llama-server --spm-infill's answers for SPM_CASES."""
    server = upstream.LlamaServer(build.tool("llama-server"), fim_path, threads=default_threads(), n_ctx=N_CTX,
                                  extra=("-b", str(N_BATCH), "--spm-infill"))
    try:
        yield {name: server.post("/infill", _upstream_body(CASES[name])) for name in SPM_CASES}
    finally:
        server.close()


@pytest.fixture(scope="module")
def fim_served(fim_model):
    with serving(fim_model, parallel=1, n_ctx=N_CTX, n_batch=N_BATCH) as (server, _engine):
        yield server


def _options(case: tuple) -> dict:
    _, _, extra, prompt, ban_eog = case
    return {"extra": extra, "prompt": prompt, "max_tokens": N_PREDICT, "temperature": 0.0, "cache_prompt": False,
            "logit_bias": dict.fromkeys(EOG, float("-inf")) if ban_eog else None}


def test_the_tool_names_fim_tokens_llama_cpp_reads(fim_model, model):
    lib = fim_model._library.lib
    ids = {role: getattr(lib, f"llama_vocab_fim_{role}")(fim_model._vocab_ptr()) for role in ("pre", "suf", "mid")}
    assert all(token >= 0 for token in ids.values()), ids
    assert lib.llama_vocab_fim_pre(model._vocab_ptr()) == -1  # SmolLM2 itself has none


@pytest.mark.parametrize("name", list(CASES))
def test_context_infill_equals_llama_server(fim_model, reference, name):
    case, expected = CASES[name], reference[name]
    context = mullama.Context(fim_model, n_ctx=N_CTX, n_batch=N_BATCH)
    try:
        tokens = infill_prompt(fim_model, case[0], case[1], prompt=case[3], extra=case[2], n_ctx=N_CTX,
                               n_batch=N_BATCH)
        assert fim_model.detokenize(tokens, unparse_special=True) == expected["prompt"]
        with context.infill(case[0], case[1], **_options(case)) as stream:
            ids = [token.id for token in stream]
        assert ids == expected["tokens"]
        assert stream.prompt_tokens == expected["tokens_evaluated"] == len(tokens)
        assert stream.text == expected["content"]
    finally:
        context.close()


def test_suffix_first_infill_equals_llama_server_spm_infill(fim_model, spm_reference):
    context = mullama.Context(fim_model, n_ctx=N_CTX, n_batch=N_BATCH)
    try:
        for name in SPM_CASES:
            case, expected = CASES[name], spm_reference[name]
            tokens = infill_prompt(fim_model, case[0], case[1], prompt=case[3], extra=case[2], n_ctx=N_CTX,
                                   n_batch=N_BATCH, spm=True)
            assert fim_model.detokenize(tokens, unparse_special=True) == expected["prompt"], name
            with context.infill(case[0], case[1], spm=True, **_options(case)) as stream:
                assert [token.id for token in stream] == expected["tokens"], name
    finally:
        context.close()


def test_async_model_infill_equals_llama_server(fim_model, reference):
    async def run() -> dict[str, tuple[list[int], int]]:
        async_model = mullama.AsyncModel(fim_model, parallel=1, n_ctx=N_CTX, n_batch=N_BATCH)
        results = {}
        try:
            for name, case in CASES.items():
                stream = async_model.infill(case[0], case[1], **_options(case))
                async with stream:
                    results[name] = ([token.id async for token in stream], stream.prompt_tokens)
        finally:
            engine = async_model.engine
            if engine is not None:
                await asyncio.to_thread(engine.close)
        return results

    for name, (ids, prompt_tokens) in asyncio.run(run()).items():
        assert ids == reference[name]["tokens"], name
        assert prompt_tokens == reference[name]["tokens_evaluated"], name


@pytest.mark.parametrize("name", list(CASES))
def test_server_infill_equals_llama_server(fim_served, reference, name):
    expected = reference[name]
    response = httpx.post(f"{fim_served.url}/infill", json=_upstream_body(CASES[name]), timeout=300)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tokens"] == expected["tokens"]
    assert body["content"] == expected["content"]
    assert body["prompt"] == expected["prompt"]
    for field in ("tokens_evaluated", "tokens_predicted", "stop_type", "stop", "has_new_line"):
        assert body[field] == expected[field], field


def test_server_infill_streams_llama_servers_events(fim_served, reference):
    name = "extra-and-prompt"
    with httpx.stream("POST", f"{fim_served.url}/infill", json=_upstream_body(CASES[name], stream=True),
                      timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    parts, final = events[:-1], events[-1]
    assert [token for part in parts for token in part["tokens"]] == reference[name]["tokens"]
    assert "".join(part["content"] for part in parts) == reference[name]["content"]
    assert not any(part["stop"] for part in parts) and final["stop"] is True
    assert final["stop_type"] == reference[name]["stop_type"]
    assert final["tokens_evaluated"] == reference[name]["tokens_evaluated"]


def test_ollama_generate_with_a_suffix_fills_in_the_middle_as_llama_server(fim_served, reference, served):
    """ollama's ``/api/generate`` ``suffix`` (editors' code completion through the ollama client): the prompt
    and the suffix make the infill prompt /infill makes, so the greedy answer is llama-server's /infill's;
    a model without FIM tokens is ollama's 400 "does not support insert" and has no "insert" capability."""
    prefix, suffix, _, _, _ = CASES["plain"]
    expected = reference["plain"]
    client = ollama.Client(host=fim_served.url)
    options = {"temperature": 0, "num_predict": N_PREDICT}
    answer = client.generate(model="smollm2:135m", prompt=prefix, suffix=suffix, options=options)
    assert answer.response == expected["content"] and answer.prompt_eval_count == expected["tokens_evaluated"]
    assert answer.context is None  # a filled middle is no conversation to continue, as raw prompts
    streamed = list(client.generate(model="smollm2:135m", prompt=prefix, suffix=suffix, options=options, stream=True))
    assert "".join(part.response for part in streamed) == expected["content"] and streamed[-1].done
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=served.url).generate(model="smollm2:135m", prompt=prefix, suffix=suffix, options=options)
    assert refused.value.status_code == 400 and refused.value.error == '"smollm2:135m" does not support insert'
    raw = ollama.Client(host=served.url).generate(model="smollm2:135m", prompt=prefix, suffix=suffix, raw=True,
                                                  options=options)
    assert raw.done  # a raw prompt ignores the suffix, as ollama's
    # ollama's capability for it, by which editors decide to send a suffix
    assert "insert" in client.show("smollm2:135m").capabilities
    assert "insert" not in ollama.Client(host=served.url).show("smollm2:135m").capabilities


def test_openai_completions_with_a_suffix_insert_as_llama_servers_infill(fim_served, reference, served):
    """OpenAI's ``suffix`` on /v1/completions: the middle between the prompt and the suffix, as /infill's."""
    prefix, suffix, _, _, _ = CASES["plain"]
    request = {"model": "m", "prompt": prefix, "suffix": suffix, "max_tokens": N_PREDICT, "temperature": 0}
    client = openai.OpenAI(base_url=f"{fim_served.url}/v1", api_key="unused")
    answer = client.completions.create(**request)
    assert answer.choices[0].text == reference["plain"]["content"]
    assert answer.usage.prompt_tokens == reference["plain"]["tokens_evaluated"]
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(**request, stream=True)
                       if chunk.choices)
    assert streamed == reference["plain"]["content"]
    for refused_field in ({"echo": True}, {"best_of": 2}):  # best_of is refused with or without a suffix
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(**request, **refused_field)
        assert refused.value.body["param"] == ("suffix" if "echo" in refused_field else "best_of")
    with pytest.raises(openai.BadRequestError, match="does not support insert") as refused:
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused").completions.create(**request)
    assert refused.value.body["param"] == "suffix"


def test_a_model_without_fim_tokens_is_a_clear_error(model):
    context = mullama.Context(model, n_ctx=512)
    try:
        with pytest.raises(mullama.InvalidConfigError, match="no FIM prefix, suffix, middle token") as info:
            context.infill("def f():\n", "\n")
        assert info.value.code == "INVALID_CONFIG"
    finally:
        context.close()

    async def run() -> None:
        async_model = mullama.AsyncModel(model, parallel=1, n_ctx=512)
        try:
            with pytest.raises(mullama.InvalidConfigError, match="infill is not supported"):
                async with async_model.infill("def f():\n", "\n") as stream:
                    async for _ in stream:
                        pass
        finally:
            if async_model.engine is not None:
                await asyncio.to_thread(async_model.engine.close)

    asyncio.run(run())


def test_the_server_refuses_infill_on_a_model_without_fim_tokens(served):
    response = httpx.post(f"{served.url}/infill", json={"input_prefix": "a", "input_suffix": "b"}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "not_supported_error" and error["code"] == 400
    assert "FIM" in error["message"]


@pytest.mark.parametrize("body, message", [
    ({"input_suffix": "b"}, "\"input_prefix\" is required"),
    ({"input_prefix": "a"}, "\"input_suffix\" is required"),
    ({"input_prefix": "a", "input_suffix": "b", "prompt": 3}, "\"prompt\" must be a string"),
    ({"input_prefix": "a", "input_suffix": "b", "input_extra": "x"}, "\"input_extra\" must be an array"),
    ({"input_prefix": "a", "input_suffix": "b", "input_extra": [{"filename": "x"}]}, "must contain a \"text\""),
    ({"input_prefix": "a", "input_suffix": "b", "input_extra": [{"text": "x", "filename": 1}]}, "\"filename\""),
    ({"input_prefix": "a", "input_suffix": "b", "temperature": "hot"}, "'temperature'"),
    ({"input_prefix": {"x": 1}, "input_suffix": "b"}, "\"input_prefix\" must be a string"),
    ({"input_prefix": "a", "input_suffix": "b", "logit_bias": [[2, "x"]]}, "must be a number or false"),
    ({"input_prefix": ["a", 10**9], "input_suffix": "b"}, "out of range"),
])
def test_bad_infill_requests_are_400s(fim_served, body, message):
    response = httpx.post(f"{fim_served.url}/infill", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"]


@pytest.fixture(scope="module")
def fim_adapter(tmp_path_factory, model_path) -> Path:
    """A LoRA adapter written by the real tool for SmolLM2, whose tensors the FIM copy shares."""
    out = tmp_path_factory.mktemp("fim-lora") / "qv.gguf"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_lora.py"), str(out), "--for", str(model_path)],
                   check=True, capture_output=True, text=True)
    return out


def test_server_infill_takes_per_request_lora_and_id_slot_as_llama_server(build, fim_path, fim_model, fim_adapter):
    """/infill's per-request ``lora`` scales give llama-server's tokens (with the same adapter loaded by
    --lora), and ``id_slot`` picks the slot the answer names (taken modulo the slots, as upstream's)."""
    scales = ([{"id": 0, "scale": 0.0}], [{"id": 0, "scale": 0.7}])
    case = CASES["extra-and-prompt"]
    server = upstream.LlamaServer(build.tool("llama-server"), fim_path, threads=default_threads(), n_ctx=N_CTX,
                                  extra=("-b", str(N_BATCH), "--lora", str(fim_adapter)))
    try:
        expected = [server.post("/infill", {**_upstream_body(case), "lora": lora})["tokens"] for lora in scales]
    finally:
        server.close()
    assert expected[0] != expected[1]  # the adapter changes the answer: the scales are honoured
    with mullama.Model.load(fim_path, lora=[fim_adapter]) as adapted, \
            serving(adapted, parallel=2, n_ctx=N_CTX, n_batch=N_BATCH) as (served, _engine):
        for lora, tokens, id_slot in zip(scales, expected, (3, 0)):
            response = httpx.post(f"{served.url}/infill", json={**_upstream_body(case), "lora": lora,
                                                                 "id_slot": id_slot}, timeout=300)
            assert response.status_code == 200, response.text
            assert response.json()["tokens"] == tokens
            assert response.json()["id_slot"] == id_slot % 2
        bad = httpx.post(f"{served.url}/infill", json={"input_prefix": "a", "input_suffix": "b", "id_slot": "x"},
                         timeout=60)
        assert bad.status_code == 400 and "'id_slot'" in bad.json()["error"]["message"]
