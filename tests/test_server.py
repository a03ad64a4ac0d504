"""`mullama serve` as a real process on 127.0.0.1, driven by the official openai client, curl,
raw HTTP and WebSocket clients; greedy output compared live with upstream llama-server."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from concurrently import run_in_threads
from mullama_server import MullamaServer

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Write a haiku about the sea 🌊."}],
]


@pytest.fixture(scope="module")
def server(model_path):
    srv = MullamaServer(model_path, parallel=4, ctx_size=1024)
    yield srv
    assert srv.close() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def upstream_chat(llama_server, messages, max_tokens):
    status, body = None, llama_server.post("/v1/chat/completions", {
        "messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
    del status
    return body


def test_ready_line_and_models(server):
    assert server.ready_line.startswith("mullama serving") and f":{server.port}/v1" in server.ready_line
    models = server.get_json("/v1/models")
    assert models["object"] == "list" and models["data"][0]["object"] == "model"


@pytest.mark.parametrize("messages", CHATS)
def test_chat_non_stream_equals_llama_server(messages, client, llama_server):
    reply = client.chat.completions.create(model="smollm2:135m", messages=messages, max_tokens=40, temperature=0)
    reference = upstream_chat(llama_server, messages, 40)
    assert reply.choices[0].message.content == reference["choices"][0]["message"]["content"]
    assert reply.choices[0].finish_reason == reference["choices"][0]["finish_reason"]
    assert reply.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == reference["usage"]["completion_tokens"]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_with_usage(client, llama_server):
    messages = CHATS[0]
    stream = client.chat.completions.create(model="smollm2:135m", messages=messages, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    reference = upstream_chat(llama_server, messages, 40)
    assert content == reference["choices"][0]["message"]["content"]
    assert chunks[-1].usage.completion_tokens == reference["usage"]["completion_tokens"]
    assert finals[0].choices[0].finish_reason == reference["choices"][0]["finish_reason"]


def test_every_turn_of_a_conversation_equals_llama_server(client, llama_server):
    """Prefix reuse (ours and upstream's prompt cache) must not change greedy output."""
    messages = [{"role": "user", "content": "Tell me about cats."}]
    for turn in range(3):
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
        reference = upstream_chat(llama_server, messages, 24)
        text = reply.choices[0].message.content
        assert text == reference["choices"][0]["message"]["content"], f"turn {turn}"
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]


def test_completions_async_client_stream_and_not(server, llama_server):
    prompt = "The three laws of robotics are"

    async def scenario():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x") as aclient:
            whole = await aclient.completions.create(model="m", prompt=prompt, max_tokens=32, temperature=0)
            stream = await aclient.completions.create(model="m", prompt=prompt, max_tokens=32, temperature=0,
                                                      stream=True)
            pieces = [c.choices[0].text async for c in stream if c.choices]
            return whole, "".join(pieces)

    whole, streamed = asyncio.run(scenario())
    reference = llama_server.post("/v1/completions", {"prompt": prompt, "max_tokens": 32, "temperature": 0.0})
    assert whole.choices[0].text == reference["choices"][0]["text"] == streamed
    assert whole.usage.completion_tokens == reference["usage"]["completion_tokens"]


def test_eight_concurrent_streams_with_four_slots(server, client, model_path):
    prompts = [f"Write a long story about {topic}:" for topic in
               ("a dragon", "the sea", "a robot", "a city", "a forest", "a ship", "a star", "a cat")]
    results: dict[int, str] = {}

    def run(i):
        stream = client.completions.create(model="m", prompt=prompts[i], max_tokens=48, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        texts, finish = [], None
        for c in stream:
            texts.append(c.choices[0].text)
            finish = c.choices[0].finish_reason or finish
        assert finish == "length"
        results[i] = "".join(texts)

    errors = run_in_threads(run, 8)
    assert not errors, errors
    assert len(results) == 8
    # each the requested length (48 tokens), and compared with a lone greedy run of the same prompt
    import mullama

    differing = 0
    with mullama.Model.load(model_path) as model, mullama.Context(model, n_ctx=1024) as ctx:
        for i, prompt in enumerate(prompts):
            lone = ctx.generate(prompt, max_tokens=48, ignore_eos=True)
            assert len(model.tokenize(results[i], add_special=False)) >= 40
            differing += results[i] != lone.text
    print(f"\nbatched greedy text differed from a lone request in {differing} of 8 streams")
    # One KV stream per sequence (as llama-server with an explicit -np): batching changes nothing.
    assert differing == 0


def test_disconnecting_clients_free_their_streams(server):
    """Twenty clients leave their streams after four lines: each stream is cancelled long before its 500
    tokens, and the server's heap does not keep them."""
    server.wait_idle()
    heap_before = server.rss_mb("RssAnon")
    cancelled = server.metric("mullama_requests_cancelled_total")
    generated = server.metric("mullama_tokens_generated_total")
    for _ in range(20):
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", server.url + "/v1/completions",
                             json={"prompt": "Count to a thousand:", "max_tokens": 500, "stream": True,
                                   "ignore_eos": True}) as response:
                lines = response.iter_lines()
                for _ in range(4):
                    next(lines)
            # leaving the block closes the connection mid-stream
    server.wait_idle()
    assert server.metric("mullama_requests_cancelled_total") == cancelled + 20
    assert server.metric("mullama_tokens_generated_total") - generated < 20 * 250  # stopped, not run to 500
    status, body = server.post("/v1/completions", {"prompt": "Hello", "max_tokens": 4})
    assert status == 200 and body["choices"][0]["text"] is not None
    assert server.rss_mb("RssAnon") - heap_before < 50


def test_websocket_streams_and_cancels(server):
    import websockets

    async def scenario():
        async with websockets.connect(server.url.replace("http", "ws") + "/v1/ws") as ws:
            await ws.send(json.dumps({"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}))
            first = []
            while True:
                message = json.loads(await ws.recv())
                first.append(message)
                if message["type"] != "token":
                    break
            await ws.send(json.dumps({"messages": [{"role": "user", "content": "Tell a long story"}],
                                      "max_tokens": 400, "ignore_eos": True}))
            second = [json.loads(await ws.recv()) for _ in range(3)]
            await ws.send(json.dumps({"type": "cancel"}))
            while True:
                message = json.loads(await ws.recv())
                if message["type"] != "token":
                    break
            await ws.send(json.dumps({"prompt": "Hi", "max_tokens": 3}))
            third = []
            while True:
                message = json.loads(await ws.recv())
                third.append(message)
                if message["type"] != "token":
                    break
            return first, second, message, third

    first, second, _after_cancel, third = asyncio.run(scenario())
    assert first[-1]["type"] == "done" and first[-1]["usage"]["completion_tokens"] == len(first) - 1 == 16
    assert all(m["type"] == "token" for m in second)
    assert third[-1]["type"] == "done" and third[-1]["usage"]["completion_tokens"] <= 3
    server.wait_idle()  # the cancelled stream is gone too


def test_the_seed_curl_command_works(server):
    result = subprocess.run(
        ["curl", "-sS", "-N", "-X", "POST", f"{server.url}/v1/chat/completions",
         "-H", "Content-Type: application/json",
         "-d", json.dumps({"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Hello!"}],
                           "stream": True, "max_tokens": 16})],
        capture_output=True, text=True, timeout=60, check=False)
    events = [line[6:] for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip()


def _malformed_requests():
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    bad_values = {
        "messages": [None, 5, "hi", [], [{}], [{"role": 5}], [{"role": "user", "content": 7}], [None],
                     [{"role": "user", "content": [{"type": "image_url"}]}]],
        "max_tokens": [-1, 0, "ten", 1.5, True, [], {}],
        "max_completion_tokens": [-5, "x"],
        "temperature": [-1, 3, "hot", []],
        "top_p": [-0.1, 1.5, "x"],
        "top_k": [-1, "x", 1.2],
        "stop": [5, [1, 2], [""], ["a"] * 40, {"a": 1}],
        "seed": [-1, "x", 2**40],
        "stream": ["yes", 1],
        "stream_options": ["x", {"include_usage": "yes"}, {"bogus": True}],
        "n": [9, 0, "1"],
        "model": [5, [], {}],
        "logprobs": ["yes", 2],
        "top_logprobs": [21, -1],
        "logit_bias": [{"x": 5}, {"1": "high"}, [1]],
        "response_format": [{"type": "xml"}, "json", {"type": "json_schema"}],
        "tools": [["f"], [{"type": "function"}], [{"type": "function", "function": {"name": "bad name"}}]],
        "tool_choice": ["sometimes", 5],
        "frequency_penalty": [5, "x"],
        "unknown_field": [1, "x"],
    }
    requests = []
    for field, values in bad_values.items():
        for value in values:
            if value is None:
                continue
            requests.append(("chat", {**base, field: value}, None))
    for body in ("{", "[1,2]", '"text"', "null", "{\"messages\": }", "\xff\xfe", ""):
        requests.append(("chat", body, None))
    for prompt in (None, 5, "", [], ["a", 5], [[]], [1, 10**9], {"p": 1}):
        requests.append(("completion", {"prompt": prompt} if prompt is not None else {}, None))
    requests.append(("chat", {**base, "messages": [{"role": "user", "content": "x" * 2_000_000}]}, None))
    requests.append(("chat", {**base, "messages": [{"role": "user", "content": "word " * 3000}]}, None))
    return requests


def test_hundreds_of_malformed_requests_get_only_4xx(server):
    cases = _malformed_requests()
    rng = random.Random(7)
    with httpx.Client(timeout=30) as http:
        statuses = []
        for _round in range(4):
            for kind, body, content_type in cases:
                path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
                data = body if isinstance(body, str) else json.dumps(body)
                headers = {"Content-Type": content_type or "application/json"}
                response = http.post(server.url + path, content=data.encode("utf-8", "surrogateescape"),
                                     headers=headers)
                statuses.append(response.status_code)
                assert 400 <= response.status_code < 500, (body if isinstance(body, str) else
                                                           str(body)[:200], response.text[:300])
                assert "error" in response.json()
            for _ in range(10):  # random bytes, wrong methods and paths
                blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
                response = http.post(server.url + "/v1/chat/completions", content=blob,
                                     headers={"Content-Type": "application/json"})
                statuses.append(response.status_code)
                assert 400 <= response.status_code < 500
            for method, path in (("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("GET", "/nope")):
                response = http.request(method, server.url + path)
                statuses.append(response.status_code)
                assert 400 <= response.status_code < 500
    assert len(statuses) >= 200
    status, body = server.post("/v1/chat/completions", {"messages": CHATS[0], "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/json; charset=utf-8"])
def test_a_json_body_is_read_whatever_its_content_type(server, content_type):
    """LiteLLM's ollama providers send JSON with no Content-Type; ollama and llama-server read it.
    A body that is not JSON stays a 400, whatever the header says."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = json.dumps({"messages": CHATS[0], "max_tokens": 4, "temperature": 0}).encode()
    with httpx.Client(timeout=60) as http:
        request = http.build_request("POST", server.url + "/v1/chat/completions", content=body, headers=headers)
        assert request.headers.get("content-type") == content_type  # (httpx adds none to raw content)
        response = http.send(request)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"]
        ollama_chat = http.post(server.url + "/api/chat", content=json.dumps(
            {"model": "m", "messages": CHATS[0], "stream": False, "options": {"num_predict": 4}}).encode(),
            headers=headers)
        assert ollama_chat.status_code == 200 and ollama_chat.json()["done"], ollama_chat.text
        refused = http.post(server.url + "/v1/chat/completions", content=b"messages=hi&max_tokens=4", headers=headers)
        assert refused.status_code == 400 and "not valid JSON" in refused.json()["error"]["message"]


def test_every_route_is_in_the_server_guide():
    """docs/server.md names every route the app has (a route nobody can find does not exist)."""
    from mullama.server._app import ROUTES

    guide = (Path(__file__).resolve().parent.parent / "docs" / "server.md").read_text()
    missing = [route.path for route in ROUTES if not re.search(rf"`(?:[A-Z]+ )?{re.escape(route.path)}`", guide)]
    assert not missing, f"docs/server.md does not name {missing}"
    assert "`POST /v1/responses`" in guide


def test_websocket_messages_over_the_limit_close_with_1009(server):
    """A message larger than the body limit (1 MiB) is refused as RFC 6455's "message too big"."""
    import websockets

    async def scenario():
        async with websockets.connect(server.url.replace("http", "ws") + "/v1/ws", max_size=None) as ws:
            await ws.send(json.dumps({"prompt": "x" * (1 << 20), "max_tokens": 2}))
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            return info.value.rcvd.code

    assert asyncio.run(scenario()) == 1009


def test_the_model_field_never_opens_a_path(server):
    for name in ("/etc/passwd", "../../../root/.ssh/id_rsa.gguf", "hf:evil/repo:x.gguf", "llama3.2:3b"):
        status, body = server.post("/v1/completions", {"model": name, "prompt": "Hi", "max_tokens": 2})
        assert status == 200
        assert body["model"] == server.get_json("/v1/models")["data"][0]["id"]  # always the served model


def test_metrics_and_health(server):
    with httpx.Client() as http:
        assert http.get(server.url + "/v1/models").status_code == 200  # (so that a 200 is counted, run alone too)
        text = http.get(server.url + "/metrics").text
    assert "# TYPE mullama_requests_total counter" in text
    assert "mullama_active_streams 0" in text
    assert 'mullama_http_responses_total{status="200"}' in text
    assert server.get_json("/health")["status"] == "ok"


def test_api_key_queue_limit_and_bind_safety(model_path):
    server = MullamaServer(model_path, parallel=1, ctx_size=512, extra=("--api-key", "sekrit", "--max-queue", "1"))
    try:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert server.post("/v1/chat/completions", body)[0] == 401
        assert server.post("/v1/chat/completions", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert server.post("/v1/chat/completions", body, {"Authorization": "Bearer sekrit"})[0] == 200
        assert server.post("/v1/chat/completions", body, {"x-api-key": "sekrit"})[0] == 200
        assert server.get_json("/health")["status"] == "ok"  # open without a key
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="sekrit")
        assert client.models.list().data
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url + "/v1", api_key="nope").models.list()

        statuses = []

        def long_request():
            statuses.append(server.post("/v1/completions", {"prompt": "Count:", "max_tokens": 200,
                                                            "ignore_eos": True},
                                        {"Authorization": "Bearer sekrit"})[0])

        threads = [threading.Thread(target=long_request) for _ in range(5)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert statuses.count(429) >= 1 and statuses.count(200) >= 2
    finally:
        assert server.close() == 0
    refused = subprocess.run([sys.executable, "-m", "mullama", "serve", "--model", str(model_path),
                              "--host", "0.0.0.0", "--port", "0"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 1 and "API key" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_sigterm_drains_in_flight_streams(model_path):
    server = MullamaServer(model_path, parallel=2, ctx_size=512)
    received = []

    def stream():
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", server.url + "/v1/completions",
                             json={"prompt": "Count:", "max_tokens": 60, "stream": True, "ignore_eos": True}) as r:
                for line in r.iter_lines():
                    received.append(line)

    worker = threading.Thread(target=stream)
    worker.start()
    while len(received) < 3:
        time.sleep(0.01)
    server.process.terminate()
    worker.join(60)
    assert server.process.wait(60) == 0
    assert "data: [DONE]" in received  # the stream in flight finished before the server left
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", server.port)) != 0


def _other_format_cases() -> list[tuple[str, object]]:
    """Malformed requests for Anthropic's and ollama's routes: the same families as above."""
    message = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, object]] = []
    anthropic_base = {"model": "m", "max_tokens": 4, "messages": message}
    for field, values in {
        "max_tokens": [None, 0, -1, "4", 1.5, True],  # (10**9 is capped at --max-tokens-limit, as everywhere)
        "messages": [None, [], "hi", [{}], [{"role": "tool"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "x"}]}]],
        "system": [5, [{"type": "image"}]], "stop_sequences": ["x", [""], [1], ["a"] * 40],
        "temperature": [-1, 2, "hot"], "top_p": [2], "top_k": [0, "x"], "stream": ["yes"],
        "tools": ["x", [{}]], "tool_choice": [{"type": "sometimes"}, "auto"], "unknown": [1],
    }.items():
        for value in values:
            body = {**anthropic_base, field: value} if value is not None else {
                k: v for k, v in anthropic_base.items() if k != field}
            cases.append(("/v1/messages", body))
    cases += [("/v1/messages", body) for body in ("{", "[]", "null", '"x"')]
    cases += [("/v1/messages/count_tokens", body) for body in ({}, {"messages": []}, "[1]")]
    for path, base in (("/api/chat", {"model": "m", "messages": message}), ("/api/generate", {"model": "m",
                                                                                               "prompt": "hi"})):
        for field, values in {"options": ["x", {"temperature": "hot"}, {"num_predict": "many"}, {"top_k": -5},
                                          {"seed": -1}, {"stop": 5}],
                              "format": ["xml", 5], "stream": ["yes"], "messages": ["hi", [{}], 5],
                              # (no prompt or messages at all asks ollama to load the model: not malformed)
                              "prompt": [5, ["hi"]], "template": ["{{ .Prompt }}"],
                              "keep_alive": ["soon", True, [1]]}.items():
            for value in values:
                if (field == "messages") != (path == "/api/chat") and field in ("messages", "prompt"):
                    continue
                if field == "template" and path == "/api/chat":  # (ollama's chat ignores fields it does not take)
                    continue
                cases.append((path, {**base, field: value}))
        cases += [(path, body) for body in ("{", "[]", "null")]
    cases += [("/api/embed", body) for body in ({}, {"input": []}, {"input": [1.5]}, {"input": ""}, "[")]
    cases += [("/api/show", body) for body in ("{", "5", {"model": 5})]
    cases += [("/api/pull", body) for body in ("{", "[]", {}, {"model": 5}, {"model": "../../etc/passwd"},
                                               {"model": "nope:1b"}, {"model": "smollm2:135m", "stream": "yes"},
                                               {"name": "%2e%2e/x"})]
    return cases


def test_malformed_anthropic_and_ollama_requests_get_only_4xx(server):
    with httpx.Client(timeout=60) as http:
        for path, body in _other_format_cases():
            data = body if isinstance(body, str) else json.dumps(body)
            response = http.post(server.url + path, content=data.encode(), headers={"Content-Type": "application/json"})
            assert 400 <= response.status_code < 500, (path, str(body)[:200], response.text[:300])
            error = response.json()
            assert ("error" in error) if path.startswith("/api/") else (error.get("type") == "error"), error
        assert http.get(server.url + "/health").json()["status"] == "ok"  # and the server goes on
