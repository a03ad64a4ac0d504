"""Reranking: ``Model.rerank``, the ``/v1/rerank`` routes and ``mullama rerank``.

The reranker is all-MiniLM with a seeded random classification head and rank pooling, written into
a temporary directory by ``tools/make_rank_model.py`` (as upstream's tests craft their models; never
checked in). The reference is upstream llama-server ``--rerank`` from the same build on the same
file: the scores must equal its scores within 1e-4, in the same order. Nothing is mocked: the real
library, the real server on 127.0.0.1, real HTTP.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import upstream
from crafted_gguf import craft, string
from inprocess_server import InProcessServer

import mullama
from mullama.generate._context import default_threads
from mullama.generate._rerank import rank_tokens
from mullama.hub import _pull
from mullama.server import ServerSettings, create_app

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_rank_model.py"
EXACT = 1e-4
QUERY = "What is a panda?"
DOCUMENTS = [
    "hi",
    "it is a bear",
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "Paris is the capital of France.",
    "Pandas eat bamboo. " * 20,  # a pair of more than 64 tokens: a decode of its own
    "Der Große Panda ist eine Bärenart. 大熊猫是中国特有的熊科动物。",
]
OTHER_QUERIES = ["capital of France", "bamboo", "ÜBER naïve café ☕"]


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return Path(_pull.resolve("all-minilm:l6-v2"))


@pytest.fixture(scope="session")
def rank_path(tmp_path_factory, minilm_path) -> Path:
    """The reranker, written by the tool (as a user runs it) into a temporary directory."""
    out = tmp_path_factory.mktemp("rerank") / "minilm-rank.gguf"
    result = subprocess.run([sys.executable, str(TOOL), str(out), str(minilm_path)], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "pooling rank" in result.stdout
    return out


@pytest.fixture(scope="module")
def reranker(rank_path):
    with mullama.Model.load(rank_path) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def minilm(minilm_path):
    with mullama.Model.load(minilm_path) as loaded:
        yield loaded


def upstream_rerank(build, path: Path, bodies: list[dict]) -> list[dict]:
    server = upstream.LlamaServer(build.tool("llama-server"), path, threads=default_threads(), n_ctx=512,
                                  extra=("--rerank",))
    try:
        return [server.post("/v1/rerank", body) for body in bodies]
    finally:
        server.close()


def as_pairs(results: list[dict]) -> list[tuple[int, float]]:
    return [(item["index"], item["relevance_score"]) for item in results]


def assert_same_ranking(ours: list[tuple[int, float]], theirs: list[tuple[int, float]]) -> float:
    """The same order of documents and scores within EXACT; returns the largest difference."""
    assert [index for index, _ in ours] == [index for index, _ in theirs]
    worst = max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs))
    assert worst < EXACT, worst
    return worst


# --- the generated model --------------------------------------------------------------------------------
def test_the_tool_writes_a_reranker(reranker, minilm):
    assert reranker.pooling == "rank" and not reranker.generative
    assert reranker._library.lib.llama_model_n_cls_out(reranker.ptr) == 1
    assert reranker.n_embd == minilm.n_embd  # the encoder is all-MiniLM's, unchanged
    assert minilm.embed(["a cat"]) == reranker.embed(["a cat"], pooling="mean")


def test_pairs_are_built_as_llama_servers_format_prompt_rerank(reranker):
    # BERT's vocabulary adds BOS ([CLS]) and SEP but no EOS: [CLS] query [SEP] document
    query, document = reranker.tokenize("a cat", add_special=False), reranker.tokenize("a dog", add_special=False)
    lib, vocab = reranker._library.lib, reranker._vocab_ptr()
    assert (bool(lib.llama_vocab_get_add_bos(vocab)), bool(lib.llama_vocab_get_add_eos(vocab)),
            bool(lib.llama_vocab_get_add_sep(vocab))) == (True, False, True)
    assert rank_tokens(reranker, "a cat", "a dog") == [lib.llama_vocab_bos(vocab), *query,
                                                         lib.llama_vocab_sep(vocab), *document]


# --- exactness against llama-server -----------------------------------------------------------------------
def test_scores_equal_llama_server_rerank(build, rank_path, reranker):
    bodies = [{"query": QUERY, "documents": DOCUMENTS}] + [{"query": query, "documents": DOCUMENTS}
                                                              for query in OTHER_QUERIES]
    answers = upstream_rerank(build, rank_path, bodies)
    worst = 0.0
    for body, theirs in zip(bodies, answers):
        ours = reranker.rerank(body["query"], DOCUMENTS)
        worst = max(worst, assert_same_ranking([(item.index, item.score) for item in ours],
                                               as_pairs(theirs["results"])))
        assert [item.document for item in ours] == [DOCUMENTS[item.index] for item in ours]
        expected_tokens = sum(len(rank_tokens(reranker, body["query"], document)) for document in DOCUMENTS)
        assert theirs["usage"]["prompt_tokens"] == expected_tokens
    print(f"largest score difference from llama-server: {worst:.3g}")
    scores = [item.score for item in reranker.rerank(QUERY, DOCUMENTS)]
    assert max(scores) - min(scores) > 0.05  # the head does tell the documents apart


def test_a_rerank_template_in_the_gguf_is_used_as_llama_server_uses_it(build, rank_path, reranker, tmp_path):
    templated = tmp_path / "templated.gguf"
    craft(rank_path, templated, {"tokenizer.chat_template.rerank": string("[CLS]q: {query}[SEP]d: {document}[SEP]")})
    (theirs,) = upstream_rerank(build, templated, [{"query": QUERY, "documents": DOCUMENTS}])
    with mullama.Model.load(templated) as model:
        tokens = rank_tokens(model, "x", "y")
        assert tokens == model.tokenize("[CLS]q: x[SEP]d: y[SEP]", add_special=False, parse_special=True)
        assert tokens != rank_tokens(reranker, "x", "y")
        ours = model.rerank(QUERY, DOCUMENTS)
    assert_same_ranking([(item.index, item.score) for item in ours], as_pairs(theirs["results"]))


# --- the Python API -----------------------------------------------------------------------------------------
def test_top_n_normalize_and_concurrent_callers(reranker):
    full = reranker.rerank(QUERY, DOCUMENTS)
    assert [item.score for item in full] == sorted((item.score for item in full), reverse=True)
    assert sorted(item.index for item in full) == list(range(len(DOCUMENTS)))
    assert reranker.rerank(QUERY, DOCUMENTS, top_n=2) == full[:2]
    assert reranker.rerank(QUERY, DOCUMENTS, top_n=100) == full
    normalized = reranker.rerank(QUERY, DOCUMENTS, normalize=True)
    assert [item.index for item in normalized] == [item.index for item in full]
    assert all(0 < item.score < 1 for item in normalized)
    # one document at a time gives the same scores as all of them together (decodes are shared by size)
    alone = {item.index: item.score for item in full}
    for index, document in enumerate(DOCUMENTS):
        (single,) = reranker.rerank(QUERY, [document])
        assert abs(single.score - alone[index]) < EXACT


def test_async_model_reranks_off_the_event_loop(reranker):
    async def scenario():
        async_model = mullama.AsyncModel(reranker)  # its engine is never started: rerank needs none
        return await asyncio.gather(*(async_model.rerank(QUERY, DOCUMENTS, top_n=3) for _ in range(3)))

    expected = reranker.rerank(QUERY, DOCUMENTS, top_n=3)
    for answer in asyncio.run(scenario()):  # concurrent callers share decodes: sums may differ in the last bits
        assert [item.index for item in answer] == [item.index for item in expected]
        assert all(abs(a.score - b.score) < EXACT for a, b in zip(answer, expected))


def test_bad_inputs_are_clear_errors(reranker, minilm):
    cases = [
        ((QUERY, []), "no documents"),
        ((QUERY, "one string"), "list of str"),
        ((QUERY, ["ok", 3]), "document 1 is a int"),
        ((QUERY, None), "list of str"),
        ((None, ["a"]), "query must be a str"),
        ((b"bytes", ["a"]), "query must be a str"),
    ]
    for args, message in cases:
        with pytest.raises(mullama.InvalidConfigError, match=message) as caught:
            reranker.rerank(*args)
        assert caught.value.code == "INVALID_CONFIG"
    for top_n in (0, -1, True, 1.5, "2"):
        with pytest.raises(mullama.InvalidConfigError, match="top_n"):
            reranker.rerank(QUERY, ["a"], top_n=top_n)
    with pytest.raises(mullama.InvalidConfigError, match="normalize"):
        reranker.rerank(QUERY, ["a"], normalize="yes")
    with pytest.raises(mullama.InvalidConfigError, match="cannot rerank: its GGUF's pooling is mean"):
        minilm.rerank(QUERY, ["a"])
    with pytest.raises(mullama.ContextOverflowError, match="the query with document 1 has") as overflow:
        reranker.rerank(QUERY, ["short", "word " * 600])
    assert overflow.value.code == "CONTEXT_OVERFLOW"
    (cut,) = reranker.rerank(QUERY, ["word " * 600], truncate=True)
    (first,) = reranker.rerank(QUERY, ["word " * 600], truncate=True, batch_size=512)
    assert cut == first


# --- the server routes --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rank_server(reranker):
    server = InProcessServer(create_app(reranker, None, ServerSettings(model_name="minilm-rank")))
    yield server
    server.close()


def test_routes_answer_in_llama_servers_shape(reranker, rank_server):
    ours = {item.index: item.score for item in reranker.rerank(QUERY, DOCUMENTS)}
    with httpx.Client(base_url=rank_server.url, timeout=120) as client:
        for path in ("/v1/rerank", "/rerank", "/v1/reranking", "/reranking"):
            response = client.post(path, json={"query": QUERY, "documents": DOCUMENTS, "top_n": 3})
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body) == {"model", "object", "usage", "results"}
            assert body["object"] == "list" and body["model"] == "minilm-rank"
            assert len(body["results"]) == 3
            for item in body["results"]:
                assert set(item) == {"index", "relevance_score"}
                assert abs(item["relevance_score"] - ours[item["index"]]) < 1e-6
            tokens = sum(len(rank_tokens(reranker, QUERY, document)) for document in DOCUMENTS)
            assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
        # Jina/Cohere: documents as objects, return_documents, the request's model name echoed
        response = client.post("/v1/rerank", json={"model": "jina-reranker", "query": QUERY, "return_documents": True,
                                                   "documents": [{"text": document} for document in DOCUMENTS[:3]]})
        body = response.json()
        assert body["model"] == "jina-reranker"
        assert [item["document"]["text"] for item in body["results"]] == \
               [DOCUMENTS[item["index"]] for item in body["results"]]
        # TEI: texts, return_text, a bare array with "score"
        response = client.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS[:2], "return_text": True})
        results = response.json()
        assert isinstance(results, list)
        assert {item["text"] for item in results} == set(DOCUMENTS[:2])
        assert all(set(item) == {"index", "score", "text"} for item in results)


def test_route_errors_are_llama_servers(build, rank_path, rank_server, minilm):
    requests = [
        ({"query": QUERY, "documents": []}, "documents", 400),
        ({"query": QUERY}, "documents", 400),
        ({"documents": ["a"]}, "query", 400),
        ({"query": 3, "documents": ["a"]}, "query", 400),
        ({"query": QUERY, "documents": "a"}, "documents", 400),
        ({"query": QUERY, "documents": [1, 2]}, "documents", 400),
        ({"query": QUERY, "documents": [{"txt": "a"}]}, "documents", 400),
        ({"query": QUERY, "documents": ["a"], "top_n": 0}, "top_n", 400),
        ({"query": QUERY, "documents": ["a"], "return_documents": "yes"}, "return_documents", 400),
        ({"query": QUERY, "documents": ["word " * 600]}, "documents item 0 has", 400),
    ]
    with httpx.Client(base_url=rank_server.url, timeout=120) as client:
        for body, words, status in requests:
            response = client.post("/v1/rerank", json=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"code", "message", "type"} and error["code"] == status
            assert error["type"] == "invalid_request_error" and words in error["message"], error
        response = client.post("/v1/rerank", content=b"not json", headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and "error" in response.json()
    # llama-server's own answer to an empty list has the same shape and status
    server = upstream.LlamaServer(build.tool("llama-server"), rank_path, threads=default_threads(), n_ctx=512,
                                  extra=("--rerank",))
    try:
        response = httpx.post(f"{server.url}/v1/rerank", json={"query": QUERY, "documents": []})
        assert response.status_code == 400
        assert set(response.json()["error"]) == {"code", "message", "type"}
    finally:
        server.close()
    # a model without rank pooling: 501 not_supported_error, as llama-server without --rerank
    plain = InProcessServer(create_app(minilm, None, ServerSettings(model_name="all-minilm")))
    try:
        response = httpx.post(f"{plain.url}/v1/rerank", json={"query": QUERY, "documents": ["a"]}, timeout=120)
        assert response.status_code == 501
        error = response.json()["error"]
        assert error["type"] == "not_supported_error" and "does not support reranking" in error["message"]
    finally:
        plain.close()


# --- the command line ---------------------------------------------------------------------------------------
def test_cli_prints_json_lines_best_first(rank_path, reranker):
    result = subprocess.run([sys.executable, "-m", "mullama", "rerank", str(rank_path), QUERY, *DOCUMENTS[:4],
                             "--top-n", "3"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    expected = reranker.rerank(QUERY, DOCUMENTS[:4], top_n=3)
    assert [(line["index"], line["document"]) for line in lines] == [(item.index, item.document) for item in expected]
    assert all(abs(line["relevance_score"] - item.score) < 1e-6 for line, item in zip(lines, expected))
    refused = subprocess.run([sys.executable, "-m", "mullama", "rerank", str(rank_path), QUERY], input="",
                             capture_output=True, text=True, timeout=300, check=False)
    assert refused.returncode == 1 and "INVALID_CONFIG" in refused.stderr and "no documents" in refused.stderr
