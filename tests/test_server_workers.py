"""Blocking work on pools of its own kind (mullama.server._workers): embedding requests never starve a
chat request's setup, listings, token counts or a model load, and an embedding request whose client
leaves stops at its next decode. A real ``mullama serve --models`` with both real models; the order
of events is asserted, never times."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import time

import httpx
import pytest
from mullama_server import MullamaServer

EMBEDDERS = 8  # twice the embedding pool (mullama.server._workers.EMBEDDINGS): some wait for a thread
INPUTS = 2048  # per embedding request: minutes of decodes, which end early because their clients leave
TOPICS = ("rivers", "prime numbers", "bread", "volcanoes", "chess openings", "tides", "violins", "glaciers")


def inputs(request: int, count: int) -> list[str]:
    """Distinct short texts (they share decodes, as real batches of chunks do)."""
    return [f"Note {request}-{i}: a short remark about {TOPICS[(request + i) % len(TOPICS)]} and item {i}."
            for i in range(count)]


def wait_for_metric(server: MullamaServer, name: str, wanted, timeout: float = 300) -> float:
    """Wait until ``wanted(value)`` holds for the metric (the bound only ends a hung test)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = server.metric(name)
        if wanted(value):
            return value
        time.sleep(0.05)
    raise AssertionError(f"{name} never reached the wanted value (last: {value})")


@pytest.fixture(scope="module")
def server():
    running = MullamaServer(None, parallel=1, ctx_size=1024, extra=("--models", "smollm2:135m,gemma3:270m"))
    yield running
    assert running.close() == 0


def test_embeddings_never_starve_chat_listings_counts_or_loads(server):
    """Eight big embedding requests in flight; a chat request, a model load, /api/tags, /api/show and a
    token count are all answered while they are (on Python's default executor, which every kind shared,
    these came only after 6 of the 8 embedding requests: its threads were all taken by them). Then the
    embedding clients leave, and their work stops."""
    cancelled = server.metric("mullama_embedding_requests_cancelled_total")
    connections = []
    for index in range(EMBEDDERS):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        connection.request("POST", "/v1/embeddings", headers={"Content-Type": "application/json"},
                           body=json.dumps({"model": "smollm2:135m", "input": inputs(index, INPUTS)}))
        connections.append(connection)
    try:
        wait_for_metric(server, "mullama_embedding_requests", lambda value: value == EMBEDDERS)
        wait_for_metric(server, "mullama_embedding_requests_running", lambda value: value >= 1)
        answers: dict[str, httpx.Response] = {}

        def call(name: str, method: str, path: str, body: dict | None = None) -> None:
            answers[name] = httpx.request(method, f"{server.url}{path}", json=body, timeout=600)

        others = [threading.Thread(target=call, args=args) for args in (
            ("chat", "POST", "/v1/chat/completions", {"model": "smollm2:135m", "max_tokens": 4, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "Name a colour."}]}),
            # gemma3:270m is a base model (no chat template): a completion loads it
            ("load", "POST", "/v1/completions", {"model": "gemma3:270m", "max_tokens": 4, "temperature": 0,
                                                 "prompt": "Colours:"}),
            ("tags", "GET", "/api/tags", None),
            ("show", "POST", "/api/show", {"model": "smollm2:135m"}),
            ("count", "POST", "/v1/messages/count_tokens",
             {"model": "smollm2:135m", "messages": [{"role": "user", "content": "How many tokens is this?"}]}))]
        for thread in others:
            thread.start()
        for thread in others:
            thread.join()
        in_flight = server.metric("mullama_embedding_requests")
        assert {name: answer.status_code for name, answer in answers.items()} == dict.fromkeys(answers, 200)
        assert answers["chat"].json()["choices"][0]["message"]["content"]
        assert answers["load"].json()["model"] == "gemma3:270m" and answers["load"].json()["choices"][0]["text"]
        assert {entry["name"] for entry in answers["tags"].json()["models"]} == {"smollm2:135m", "gemma3:270m"}
        assert answers["show"].json()["details"]["family"] == "llama"
        assert answers["count"].json()["input_tokens"] > 5
        # (the first four share their decodes and end together: at worst they did, while the others worked)
        assert in_flight >= EMBEDDERS // 2, "the other requests waited for embedding requests to be answered"
    finally:
        for connection in connections:
            connection.close()  # the embedding clients leave
    wait_for_metric(server, "mullama_embedding_requests", lambda value: value == 0)
    assert server.metric("mullama_embedding_requests_cancelled_total") >= cancelled + 1


def test_a_client_that_leaves_mid_embedding_frees_the_server(server):
    cancelled = server.metric("mullama_embedding_requests_cancelled_total")
    body = json.dumps({"model": "smollm2:135m", "input": inputs(99, 2048)})
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    connection.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
    wait_for_metric(server, "mullama_embedding_requests_running", lambda value: value == 1)
    connection.close()  # the client leaves
    wait_for_metric(server, "mullama_embedding_requests", lambda value: value == 0)
    assert server.metric("mullama_embedding_requests_running") == 0
    assert server.metric("mullama_embedding_requests_cancelled_total") == cancelled + 1  # stopped before its end
    answer = httpx.post(f"{server.url}/v1/embeddings", json={"model": "smollm2:135m", "input": "next"}, timeout=300)
    assert answer.status_code == 200 and len(answer.json()["data"]) == 1


def test_sigterm_does_not_wait_for_an_abandoned_embedding():
    running = MullamaServer("smollm2:135m", parallel=1, ctx_size=512)
    try:
        body = json.dumps({"input": inputs(7, 2048)})
        connection = http.client.HTTPConnection("127.0.0.1", running.port, timeout=600)
        connection.request("POST", "/v1/embeddings", body=body, headers={"Content-Type": "application/json"})
        wait_for_metric(running, "mullama_embedding_requests_running", lambda value: value == 1)
        connection.close()
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=600) == 0
        # the process ended with the work stopped at its next decode, not run to its end
        assert not any("Traceback" in line for line in running.log), "\n".join(running.log)
    finally:
        if running.process.poll() is None:
            running.process.kill()
