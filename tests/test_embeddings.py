"""Embeddings on the real models: Model.embed, AsyncModel.embed, /v1/embeddings, `mullama embed`.

The reference is upstream llama-server from the same build, started with ``--embeddings``
(and ``--pooling mean`` for the generative default model, whose GGUF names no pooling), asked
over HTTP: our vectors must equal its vectors within 1e-6 (the issue asks 1e-4; they agree to
about 5e-8), whether embedded alone or many per decode. The second model is a real BERT
encoder (all-MiniLM-L6-v2), the kind of model embeddings are mostly computed with.
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import math
import subprocess
import sys
import threading

import pytest
import upstream
from concurrently import run_in_threads
from inprocess_server import InProcessServer, serving

import mullama
from mullama.generate._context import default_threads
from mullama.hub import _pull
from mullama.server import ServerSettings, create_app

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "敏捷的棕色狐狸跳过了懒狗。",
    "🦊🐕 emoji only 🎉",
    "def add(a, b):\n    return a + b",
    "a",
    "Embeddings map text to vectors; similar texts get nearby vectors. " * 12,  # a long one (~170 tokens)
    "  leading and trailing spaces  ",
    "Ünïcödé àccents, ß, and ñ",
    "<|im_start|>user special-token text<|im_end|>",
]


EXACT = 1e-6  # max abs difference of unit vectors that we call equal (float32 rounding, summation order)


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))


def upstream_vectors(server: upstream.LlamaServer, inputs) -> list[list[float]]:
    body = server.post("/v1/embeddings", {"input": inputs, "encoding_format": "float"})
    return [item["embedding"] for item in sorted(body["data"], key=lambda item: item["index"])]


@pytest.fixture(scope="module")
def mean_server(build, model_path):
    """llama-server --embeddings --pooling mean on the default model."""
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(),
                                  extra=("--embeddings", "--pooling", "mean"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def minilm_path():
    return _pull.resolve("all-minilm:l6-v2")


@pytest.fixture(scope="module")
def minilm(minilm_path):
    with mullama.Model.load(minilm_path) as loaded:
        yield loaded


# --- exactness -----------------------------------------------------------------------------------
def test_mean_pooled_vectors_equal_llama_server(model, mean_server):
    ours = model.embed(TEXTS, pooling="mean")
    theirs = upstream_vectors(mean_server, TEXTS)
    assert len(ours) == len(theirs) == len(TEXTS)
    worst = max(max_difference(a, b) for a, b in zip(ours, theirs))
    assert worst < EXACT, worst
    assert all(abs(norm(v) - 1) < 1e-6 for v in ours)
    assert len(ours[0]) == model.n_embd == 576


def test_a_generative_model_embeds_with_mean_pooling_by_default(model):
    assert model.pooling is None and model.generative
    assert model.embed(TEXTS[:3]) == model.embed(TEXTS[:3], pooling="mean")


def test_bert_model_equals_llama_server_and_ranks_meaning(build, minilm, minilm_path):
    assert (minilm.pooling, minilm.n_embd, minilm.generative) == ("mean", 384, False)
    server = upstream.LlamaServer(build.tool("llama-server"), minilm_path, threads=default_threads(),
                                  n_ctx=512, extra=("--embeddings",))
    try:
        theirs = upstream_vectors(server, TEXTS)
    finally:
        server.close()
    ours = minilm.embed(TEXTS)
    worst = max(max_difference(a, b) for a, b in zip(ours, theirs))
    assert worst < EXACT, worst
    cat, kitten, market = minilm.embed(["A cat sits on the mat.", "A kitten is lying on a rug.",
                                        "The stock market fell sharply today."])
    assert cosine(cat, kitten) > cosine(cat, market) + 0.2


def test_an_embedding_model_refuses_to_generate(minilm):
    with pytest.raises(mullama.InvalidConfigError, match="embedding model"):
        mullama.Context(minilm)
    assert minilm.embed_one("still embeds")


def test_batched_equals_one_by_one(model):
    together = model.embed(TEXTS)
    alone = [model.embed_one(text) for text in TEXTS]
    worst = max(max_difference(a, b) for a, b in zip(together, alone))
    assert worst < EXACT, worst


def test_small_batches_split_the_texts_and_give_the_same_vectors(model):
    whole = model.embed(TEXTS[:6], batch_size=512)
    split = model.embed(TEXTS[:6], batch_size=32)  # several decodes, at most 32 tokens each
    assert max(max_difference(a, b) for a, b in zip(whole, split)) < EXACT


def test_raw_vectors_and_normalisation(model):
    raw = model.embed(TEXTS[:4], normalize=False)
    unit = model.embed(TEXTS[:4])
    for r, u in zip(raw, unit):
        assert norm(r) > 1.5  # this model's raw vectors are long
        assert max_difference([x / norm(r) for x in r], u) < 1e-6


def test_per_token_vectors_average_to_the_mean_and_end_at_the_last(model):
    text = "Pooling is a summary of the token vectors."
    per_token = model.embed(text, pooling="none", normalize=False)[0]
    assert len(per_token) == len(model.tokenize(text, add_special=True, parse_special=True))
    mean = [sum(column) / len(per_token) for column in zip(*per_token)]
    assert max_difference(mean, model.embed(text, pooling="mean", normalize=False)[0]) < 1e-4
    assert max_difference(per_token[-1], model.embed(text, pooling="last", normalize=False)[0]) < 1e-4


def test_as_numpy_gives_one_float32_array(model):
    np = pytest.importorskip("numpy")
    matrix = model.embed(TEXTS[:5], as_numpy=True)
    assert matrix.shape == (5, model.n_embd) and matrix.dtype == np.float32
    lists = model.embed(TEXTS[:5])
    assert float(np.abs(matrix - np.array(lists)).max()) < 1e-6
    per_token = model.embed(["one two three"], pooling="none", as_numpy=True)
    assert per_token[0].shape[1] == model.n_embd


def test_token_lists_are_embedded_as_given(model):
    tokens = model.tokenize(TEXTS[0], add_special=True, parse_special=True)
    assert model.embed([tokens]) == model.embed(TEXTS[0])


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("texts, match", [
    ("", "empty"), ([], "no texts"), (["fine", ""], "text 1 is empty"), ([b"bytes"], "not a str"),
    ([1.5], "not a str"), (None, "takes a str"), (b"bytes", "takes a str"), ([[]], "no texts|empty"),
])
def test_bad_texts_are_invalid_config(model, texts, match):
    with pytest.raises(mullama.InvalidConfigError, match=match) as caught:
        model.embed(texts)
    assert caught.value.code == "INVALID_CONFIG"


@pytest.mark.parametrize("options", [{"pooling": "max"}, {"pooling": 1}, {"batch_size": 0}, {"batch_size": "8"},
                                     {"normalize": "yes"}, {"truncate": 1}])
def test_bad_options_are_invalid_config(model, options):
    with pytest.raises(mullama.InvalidConfigError):
        model.embed("text", **options)


def test_token_ids_out_of_range_are_refused(model):
    with pytest.raises(mullama.TokenizeError):
        model.embed([[1, 2, 10**9]])


def test_a_text_longer_than_the_batch_overflows_or_is_truncated(model):
    long_text = "word " * 700
    with pytest.raises(mullama.ContextOverflowError, match="text 1 has") as caught:
        model.embed(["short", long_text])
    assert caught.value.code == "CONTEXT_OVERFLOW"
    cut = model.embed(long_text, truncate=True)[0]
    first = model.tokenize(long_text, add_special=True, parse_special=True)[:512]
    assert max_difference(cut, model.embed([first])[0]) < 1e-6
    assert len(model.embed(long_text, batch_size=1024)[0]) == model.n_embd


def test_a_thousand_texts_embed_in_order(model):
    np = pytest.importorskip("numpy")
    texts = [f"item {i}" for i in range(1000)]
    matrix = model.embed(texts, as_numpy=True)
    assert matrix.shape == (1000, model.n_embd)
    for i in (0, 499, 999):
        assert float(np.abs(matrix[i] - np.array(model.embed_one(texts[i]))).max()) < 1e-6


# --- threads, async, lifetime -------------------------------------------------------------------------
def test_concurrent_callers_share_decodes_and_get_their_own_vectors(model):
    alone = [model.embed_one(text) for text in TEXTS[:8]]
    embedder = model._embedder(1, 512)
    before = embedder.decodes
    barrier = threading.Barrier(8)
    results: list = [None] * 8

    def work(i: int) -> None:
        barrier.wait()
        results[i] = model.embed_one(TEXTS[i])

    assert run_in_threads(work, 8) == []
    assert all(max_difference(a, b) < EXACT for a, b in zip(results, alone))
    assert embedder.decodes - before < 8  # callers that waited were decoded together


def test_async_embed_never_blocks_the_event_loop(model):
    from test_async import loop_turns_during

    async_model = mullama.AsyncModel(model)

    async def main():
        async def work():
            return await asyncio.gather(*(async_model.embed(TEXTS) for _ in range(8)))
        return await loop_turns_during(work)

    results, turns = asyncio.run(main())
    print(f"\nthe event loop turned {turns} times during 8 embeddings of {len(TEXTS)} texts")
    assert turns >= 20, turns  # the decodes ran off the loop (on it, a turn or two between them)
    reference = model.embed(TEXTS)
    assert all(max(max_difference(a, b) for a, b in zip(result, reference)) < EXACT for result in results)


def test_the_embedding_context_is_freed_with_the_model(model_path):
    from mullama.native import _owned

    freed = _owned.freed_count["embedder"]
    loaded = mullama.Model.load(model_path)
    loaded.embed("make the context")
    context = mullama.Context(loaded, n_ctx=256)
    with pytest.raises(mullama.ContextError):
        loaded.close()  # a Context is still open: refused, as before
    context.close()
    loaded.close()  # the model's own embedding context does not count as one
    assert _owned.freed_count["embedder"] >= freed + 1
    with pytest.raises(mullama.ClosedError):
        loaded.embed("closed")


# --- the server ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedding_server(model):
    with serving(model, parallel=2, n_ctx=512) as (server, _engine):
        yield server


def test_openai_client_embeddings_equal_llama_server(embedding_server, mean_server, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{embedding_server.url}/v1", api_key="unused")
    # The client asks for base64 unless told otherwise and decodes it: both encodings are used here.
    default = client.embeddings.create(model="smollm2:135m", input=TEXTS)
    floats = client.embeddings.create(model="smollm2:135m", input=TEXTS, encoding_format="float")
    theirs = upstream_vectors(mean_server, TEXTS)
    assert [item.index for item in default.data] == list(range(len(TEXTS)))
    for a, b, c in zip(default.data, floats.data, theirs):
        assert max_difference(a.embedding, b.embedding) < 1e-6  # base64 is float32: the same values
        assert max_difference(b.embedding, c) < EXACT
    n_tokens = sum(len(model.tokenize(t, add_special=True, parse_special=True)) for t in TEXTS)
    assert default.usage.prompt_tokens == default.usage.total_tokens == n_tokens


def test_base64_is_little_endian_float32_of_the_float_answer(embedding_server):
    import httpx

    url = f"{embedding_server.url}/v1/embeddings"
    packed = httpx.post(url, json={"input": "hello", "encoding_format": "base64"}, timeout=60).json()
    plain = httpx.post(url, json={"input": "hello"}, timeout=60).json()
    decoded = array.array("f", base64.b64decode(packed["data"][0]["embedding"])).tolist()
    assert decoded == pytest.approx(plain["data"][0]["embedding"], abs=1e-7)
    assert plain["object"] == "list" and plain["data"][0]["object"] == "embedding"


def test_token_list_inputs_over_http(embedding_server, model):
    import httpx

    tokens = model.tokenize("hello world", add_special=True, parse_special=True)
    url = f"{embedding_server.url}/v1/embeddings"
    one = httpx.post(url, json={"input": tokens}, timeout=60).json()
    many = httpx.post(url, json={"input": [tokens, tokens]}, timeout=60).json()
    text = httpx.post(url, json={"input": "hello world"}, timeout=60).json()
    assert one["data"][0]["embedding"] == text["data"][0]["embedding"] == many["data"][1]["embedding"]
    assert one["usage"]["prompt_tokens"] == len(tokens)


@pytest.mark.parametrize("body, status, param", [
    ({}, 400, "input"), ({"input": ""}, 400, "input"), ({"input": []}, 400, "input"),
    ({"input": ["ok", 3]}, 400, "input"), ({"input": [[]]}, 400, "input"), ({"input": {"text": "x"}}, 400, "input"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "dimensions": 128}, 400, "dimensions"), ({"input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"input": "x", "pooling": "max"}, 400, "pooling"),
    ({"input": [[1, 2, 10**9]]}, 400, "input"),
    ({"input": "word " * 700}, 400, "input"),
    ({"input": [f"text {i}" for i in range(2049)]}, 400, "input"),
])
def test_bad_embedding_requests_are_400s(embedding_server, body, status, param):
    import httpx

    response = httpx.post(f"{embedding_server.url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize("inputs, item, token", [
    ([[9906, 1917, 100256]], 0, 100256),  # tiktoken's cl100k ids for "Hello world<|endoftext|>"
    ([[1, 2], [5, -3]], 1, -3),
    ([7, 49152], 0, 49152),  # one past the vocabulary
])
def test_token_ids_that_cannot_be_the_model_s_are_a_400_that_says_so(embedding_server, model, inputs, item, token):
    """Clients that count tokens with tiktoken send its ids (LangChain's OpenAIEmbeddings by default),
    which embed as some other text: ids the model cannot have are refused, naming the item and the
    id, and saying to send the text."""
    openai = pytest.importorskip("openai")
    assert model.vocab_size == 49152
    client = openai.OpenAI(base_url=f"{embedding_server.url}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="smollm2:135m", input=inputs)
    error = caught.value.body
    assert error["param"] == "input"
    assert f"item {item}" in error["message"] and f"token id {token}" in error["message"]
    assert "check_embedding_ctx_length=False" in error["message"]


def test_langchain_openai_embeddings_sending_texts(embedding_server, model):
    """LangChain's OpenAIEmbeddings with check_embedding_ctx_length=False (docs/embeddings.md) sends
    the texts: its vectors are the model's."""
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(base_url=f"{embedding_server.url}/v1", api_key="unused", model="smollm2:135m",
                                  check_embedding_ctx_length=False)
    documents = embeddings.embed_documents(TEXTS[:3])
    query = embeddings.embed_query(TEXTS[0])
    expected = model.embed(TEXTS[:3])
    assert max(max_difference(a, b) for a, b in zip(documents, expected)) < EXACT
    assert max_difference(query, expected[0]) < EXACT


def test_ten_thousand_texts_are_refused_whole(embedding_server):
    import httpx

    response = httpx.post(f"{embedding_server.url}/v1/embeddings", json={"input": ["hi"] * 10_000}, timeout=60)
    assert response.status_code in (400, 413)
    assert "2048" in response.json()["error"]["message"] or response.status_code == 413


def test_dimensions_equal_to_the_model_s_are_accepted(embedding_server, model):
    import httpx

    response = httpx.post(f"{embedding_server.url}/v1/embeddings",
                          json={"input": "x", "dimensions": model.n_embd}, timeout=60)
    assert response.status_code == 200 and len(response.json()["data"][0]["embedding"]) == model.n_embd


def test_an_embedding_model_server_embeds_and_refuses_chat(minilm):
    import httpx

    server = InProcessServer(create_app(minilm, None, ServerSettings(model_name="all-minilm:l6-v2")))
    try:
        body = httpx.post(f"{server.url}/v1/embeddings", json={"input": ["a", "b"]}, timeout=60).json()
        assert [len(item["embedding"]) for item in body["data"]] == [384, 384]
        chat = httpx.post(f"{server.url}/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert chat.status_code == 400 and "embedding model" in chat.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health", timeout=10).json()["status"] == "ok"
        assert httpx.get(f"{server.url}/metrics", timeout=10).status_code == 200
    finally:
        server.close()


def test_ollama_s_legacy_embeddings_on_an_embedding_model(minilm):
    """``ollama.Client().embeddings(model, prompt)`` (``/api/embeddings``) on a sentence-embedding
    model: the raw pooled vector, as ollama answers it; ``/api/embed`` gives it at unit length."""
    import ollama

    server = InProcessServer(create_app(minilm, None, ServerSettings(model_name="all-minilm:l6-v2")))
    try:
        client = ollama.Client(host=server.url)
        text = "A cat sits on the mat."
        legacy = client.embeddings(model="all-minilm:l6-v2", prompt=text).embedding
        assert max_difference(legacy, minilm.embed(text, normalize=False)[0]) < EXACT
        unit = client.embed(model="all-minilm:l6-v2", input=text).embeddings[0]
        assert max_difference(unit, minilm.embed_one(text)) < EXACT
        assert abs(cosine(legacy, unit) - 1) < 1e-6 and abs(norm(legacy) - 1) > 1e-3
    finally:
        server.close()


def test_mullama_embed_prints_one_json_line_per_text(model, model_path):
    result = subprocess.run([sys.executable, "-m", "mullama", "embed", str(model_path), "first text", "second"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["first text", "second"]
    expected = model.embed(["first text", "second"])
    assert all(max_difference(line["embedding"], e) < EXACT for line, e in zip(lines, expected))
    after_options = subprocess.run([sys.executable, "-m", "mullama", "embed", str(model_path), "--batch-size", "64",
                                    "first text", "second"], capture_output=True, text=True, timeout=300, check=False)
    assert after_options.returncode == 0, after_options.stderr  # texts after an option are texts still, as run's
    assert [json.loads(line)["text"] for line in after_options.stdout.splitlines()] == ["first text", "second"]
    piped = subprocess.run([sys.executable, "-m", "mullama", "embed", "-m", str(model_path), "--pooling", "last"],
                           input="one\n\ntwo\n", capture_output=True, text=True, timeout=300, check=False)
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 2
    empty = subprocess.run([sys.executable, "-m", "mullama", "embed", "-m", str(model_path), ""],
                           capture_output=True, text=True, timeout=300, check=False)
    assert empty.returncode == 1 and "INVALID_CONFIG" in empty.stderr


def test_a_dropped_model_frees_its_embedding_context_by_refcount_alone(model_path):
    import gc

    from mullama.native import _owned

    freed = dict(_owned.freed_count)
    gc.disable()
    try:
        loaded = mullama.Model.load(model_path)
        loaded.embed(["no cycle keeps either alive"])
        del loaded
        assert _owned.freed_count["embedder"] == freed.get("embedder", 0) + 1
        assert _owned.freed_count["model"] == freed.get("model", 0) + 1
    finally:
        gc.enable()
