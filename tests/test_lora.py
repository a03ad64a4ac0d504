"""LoRA adapters against upstream: greedy output with adapters equals llama-server ``--lora`` /
``--lora-scaled`` (and its per-request ``lora``) token for token, through ``Context``, ``AsyncModel``
(whose engine batches sequences of different adapter sets in turns) and our server; scale 0 equals the
base model; ``GET``/``POST /lora-adapters`` answer in llama-server's shapes; a bad adapter file is a
clear error.

No package ships an adapter, so ``tools/make_lora.py`` writes two random ones for SmolLM2 (as
upstream's converter lays them out); both servers and the Python API load the same files.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import upstream
from inprocess_server import serving
from mullama_server import MullamaServer

import mullama
from mullama.generate._context import default_threads
from mullama.native._owned import freed_count, owned_count

REPO = Path(__file__).resolve().parent.parent
N_CTX, N_PREDICT = 1024, 32
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
# Per-request adapter scales (llama-server's "lora" field; ids not listed are at 0), by case name.
CASES = {
    "default": None,  # the server's: adapter 0 at 1.0 (--lora), adapter 1 at 0.5 (--lora-scaled)
    "first-0.7": [{"id": 0, "scale": 0.7}],
    "second-2": [{"id": 1, "scale": 2.0}],
    "none": [{"id": 0, "scale": 0.0}],
}
NO_TIMEOUT = 3_600_000  # ms: a loaded test machine must not turn a slow step into a failure


def _make(out: Path, model_path: Path, *args: str) -> Path:
    subprocess.run([sys.executable, str(REPO / "tools" / "make_lora.py"), str(out), "--for", str(model_path), *args],
                   check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_path) -> tuple[Path, Path]:
    """Two adapters written by the real tool: attention q/v (seed 0) and k/output (seed 1)."""
    directory = tmp_path_factory.mktemp("lora")
    return (_make(directory / "qv.gguf", model_path),
            _make(directory / "ko.gguf", model_path, "--seed", "1", "--targets", "attn_k,attn_output", "--rank", "4"))


@pytest.fixture(scope="module")
def reference(build, model_path, adapters):
    """llama-server --lora A --lora-scaled B:0.5: greedy tokens for each (case, prompt), its
    /lora-adapters answers."""
    first, second = adapters
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(), n_ctx=N_CTX,
                                  extra=("--lora", str(first), "--lora-scaled", f"{second}:0.5"))
    try:
        answers = {}
        for name, lora in CASES.items():
            for prompt in PROMPTS:
                fields = {} if lora is None else {"lora": lora}
                answers[name, prompt] = server.greedy(prompt, N_PREDICT, **fields)
        with httpx.Client(timeout=60) as client:
            listed = client.get(f"{server.url}/lora-adapters").json()
            posted = client.post(f"{server.url}/lora-adapters", json=[{"id": 0, "scale": 0.7}]).json()
            after = client.get(f"{server.url}/lora-adapters").json()
            answers["posted"] = server.greedy(PROMPTS[0], N_PREDICT)
            answers["not-a-list"] = client.post(f"{server.url}/lora-adapters", json={"id": 0})
        yield answers, listed, posted, after
    finally:
        server.close()


@pytest.fixture(scope="module")
def lora_model(model_path, adapters):
    first, second = adapters
    with mullama.Model.load(model_path, lora=[first, (second, 0.5)]) as loaded:
        yield loaded


def _scales(lora: list[dict] | None) -> dict[int, float] | None:
    return None if lora is None else {entry["id"]: entry["scale"] for entry in lora}


def _greedy(context: mullama.Context, prompt: str, **options) -> list[int]:
    stream = context.generate_stream(prompt, max_tokens=N_PREDICT, temperature=0, cache_prompt=False,
                                     timeout_ms=NO_TIMEOUT, **options)
    return [token.id for token in stream]


def test_the_adapter_changes_greedy_output(reference):
    answers = reference[0]
    for prompt in PROMPTS:
        assert answers["default", prompt]["tokens"] != answers["none", prompt]["tokens"], prompt


def test_context_equals_llama_server(lora_model, reference):
    answers = reference[0]
    with mullama.Context(lora_model, n_ctx=N_CTX) as context:
        assert context.lora == [(str(a.path), a.scale) for a in lora_model.lora]  # the model's, by default
        for name, lora in CASES.items():
            for prompt in PROMPTS:
                options = {} if lora is None else {"lora": _scales(lora)}
                assert _greedy(context, prompt, **options) == answers[name, prompt]["tokens"], (name, prompt)


def test_set_lora_by_path_and_scale_zero_is_the_base_model(lora_model, model, adapters, reference):
    answers = reference[0]
    first, _ = adapters
    with mullama.Context(lora_model, n_ctx=N_CTX) as context, mullama.Context(model, n_ctx=N_CTX) as base:
        context.set_lora({first: 0.7})
        assert context.lora == [(str(first.resolve()), 0.7)]
        assert _greedy(context, PROMPTS[0]) == answers["first-0.7", PROMPTS[0]]["tokens"]
        context.set_lora({first: 0.0})
        for prompt in PROMPTS:
            assert _greedy(context, prompt) == _greedy(base, prompt) == answers["none", prompt]["tokens"]
        context.set_lora(None)  # back to the model's
        assert _greedy(context, PROMPTS[1]) == answers["default", PROMPTS[1]]["tokens"]


def test_async_model_batches_adapter_sets_in_turns(lora_model, reference):
    """Four streams of four adapter sets at once, on four slots: each batch holds one set (so here one
    sequence, decoded as llama-server -np 1 decodes it), and every stream equals llama-server's."""
    answers = reference[0]

    async def run() -> dict[tuple[str, str], list[int]]:
        async_model = mullama.AsyncModel(lora_model, parallel=4, n_ctx=N_CTX)

        async def one(name: str, prompt: str) -> list[int]:
            lora = CASES[name]
            options = {} if lora is None else {"lora": _scales(lora)}
            stream = async_model.generate_stream(prompt, max_tokens=N_PREDICT, temperature=0, cache_prompt=False,
                                                 timeout_ms=NO_TIMEOUT, **options)
            async with stream:
                return [token.id async for token in stream]

        try:
            keys = [(name, PROMPTS[i % 2]) for i, name in enumerate(CASES)]
            results = await asyncio.gather(*(one(*key) for key in keys))
            return dict(zip(keys, results))
        finally:
            if async_model.engine is not None:
                await asyncio.to_thread(async_model.engine.close)

    for key, ids in asyncio.run(run()).items():
        assert ids == answers[key]["tokens"], key
    assert lora_model.lora[0].scale == 1.0  # a request's scales are its own


@pytest.fixture(scope="module")
def lora_served(lora_model):
    with serving(lora_model, parallel=2, n_ctx=N_CTX) as (server, _engine):
        yield server


def _complete(url: str, prompt: str, lora: list[dict] | None = None) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": N_PREDICT, "temperature": 0, "cache_prompt": False}
    if lora is not None:
        body["lora"] = lora
    return httpx.post(f"{url}/v1/completions", json=body, timeout=300)


def test_server_per_request_lora_equals_llama_server(lora_served, reference):
    answers = reference[0]
    for name, lora in CASES.items():
        for prompt in PROMPTS:
            response = _complete(lora_served.url, prompt, lora)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == answers[name, prompt]["content"], (name, prompt)


def test_server_chat_takes_per_request_lora(lora_served, lora_model):
    messages = [{"role": "user", "content": "Name a colour."}]
    texts = []
    for lora in ([{"id": 0, "scale": 0.0}], None):
        body = {"messages": messages, "max_tokens": 16, "temperature": 0, **({} if lora is None else {"lora": lora})}
        response = httpx.post(f"{lora_served.url}/v1/chat/completions", json=body, timeout=300)
        assert response.status_code == 200, response.text
        texts.append(response.json()["choices"][0]["message"]["content"])
    prompt = lora_model.apply_chat_template(messages)
    with mullama.Context(lora_model, n_ctx=N_CTX) as context:
        expected = [context.generate(prompt, 16, temperature=0, lora=lora, timeout_ms=NO_TIMEOUT).text
                    for lora in ({}, None)]
    assert texts == expected


def test_lora_adapters_routes_answer_as_llama_server(lora_served, lora_model, reference):
    answers, listed, posted, after = reference
    ours = httpx.get(f"{lora_served.url}/lora-adapters", timeout=60).json()
    assert [sorted(entry) for entry in ours] == [sorted(entry) for entry in listed]
    assert [(e["id"], Path(e["path"]).name, e["scale"]) for e in ours] == \
           [(e["id"], Path(e["path"]).name, e["scale"]) for e in listed]
    try:
        response = httpx.post(f"{lora_served.url}/lora-adapters", json=[{"id": 0, "scale": 0.7}], timeout=60)
        assert response.status_code == 200 and response.json() == posted == {"success": True}
        now = httpx.get(f"{lora_served.url}/lora-adapters", timeout=60).json()
        assert [(e["id"], e["scale"]) for e in now] == [(e["id"], e["scale"]) for e in after]
        assert [(e["id"], e["scale"]) for e in now] == [(0, pytest.approx(0.7)), (1, 0.0)]  # float32, as llama.cpp
        response = _complete(lora_served.url, PROMPTS[0])  # no lora of its own: the posted scales
        assert response.json()["choices"][0]["text"] == answers["posted"]["content"]
        bad = httpx.post(f"{lora_served.url}/lora-adapters", json={"id": 0}, timeout=60)
        assert bad.status_code == answers["not-a-list"].status_code == 400
        assert bad.json()["error"]["message"] == answers["not-a-list"].json()["error"]["message"]
    finally:
        lora_model.lora[0].scale, lora_model.lora[1].scale = 1.0, 0.5


def test_server_refuses_a_bad_lora_field(lora_served):
    for lora, what in (({"id": 0}, "must be an array"), ([{"id": 7, "scale": 1}], "does not exist"),
                       ([{"id": "x", "scale": 1}], "'id' must be an integer")):
        response = _complete(lora_served.url, PROMPTS[0], lora)  # type: ignore[arg-type]
        assert response.status_code == 400, response.text
        assert what in response.json()["error"]["message"]


def test_mullama_serve_lora_flags(model_path, adapters):
    first, second = adapters
    server = MullamaServer(model_path, parallel=1, extra=("--lora", str(first), "--lora-scaled", f"{second}:0.25",
                                                          "--lora-init-without-apply"))
    try:
        listed = server.get_json("/lora-adapters")
        assert [(e["id"], e["path"], e["scale"]) for e in listed] == \
               [(0, str(first.resolve()), 0.0), (1, str(second.resolve()), 0.0)]
    finally:
        server.close()
    result = subprocess.run([sys.executable, "-m", "mullama", "serve", "--model", str(model_path),
                             "--lora-scaled", str(first)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "FNAME:SCALE" in result.stderr


def test_bad_adapter_files_are_clear_errors(model, model_path, tmp_path, adapters):
    first, _ = adapters
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    text = tmp_path / "notes.gguf"
    text.write_text("not an adapter")
    cases = {tmp_path / "missing.gguf": "cannot read", text: "not a GGUF file", truncated: "corrupted or incomplete",
             model_path: "general.type to be 'adapter'"}
    for path, reason in cases.items():
        with pytest.raises(mullama.ModelLoadError) as caught:
            model.load_lora(path)
        assert caught.value.code == "LORA_LOAD_ERROR" and reason in str(caught.value), (path, str(caught.value))
    assert model.lora == []  # nothing half-loaded; the model still generates
    with mullama.Context(model, n_ctx=256) as context:
        assert len(_greedy(context, PROMPTS[0])) == N_PREDICT
    with pytest.raises(mullama.ModelLoadError):
        mullama.Model.load(model_path, lora=[truncated])
    with mullama.Context(model, n_ctx=256) as context, pytest.raises(mullama.InvalidConfigError):
        context.set_lora({0: 1.0})  # this model has no adapter 0


def test_adapters_are_freed_once_with_their_model(model_path, adapters):
    owned, freed = owned_count["lora"], freed_count["lora"]
    loaded = mullama.Model.load(model_path, lora=list(adapters))
    again = loaded.load_lora(adapters[0], 0.3)  # the same file: the same adapter
    assert again is loaded.lora[0] and len(loaded.lora) == 2 and owned_count["lora"] == owned + 2
    loaded.close()
    loaded.close()
    assert freed_count["lora"] == freed + 2 and all(adapter.closed for adapter in loaded.lora)
