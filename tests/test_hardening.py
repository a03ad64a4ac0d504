"""Hardening: one request never takes the server down, absurd values fail at once and clearly,
the event loop stays free, a fork()ed child is safe. Real model, real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
import sys
import textwrap
import threading

import httpx
import pytest
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inprocess_server import serving, wait_for

import mullama
from mullama import StreamConfig
from mullama.generate._engine import Engine
from mullama.server import ServerSettings

EXTREME_INTS = st.sampled_from([2**31, 2**31 - 1, 2**32, 2**63, 2**64, -(2**31) - 1, -(2**63), 10**30, -1, 0])
EXTREME_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 1e30])
EXTREME = st.one_of(EXTREME_INTS, EXTREME_FLOATS, st.integers(), st.floats())
NUMERIC_FIELDS = ["max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "buffer_size", "timeout_ms",
                  "repeat_penalty", "repeat_last_n", "frequency_penalty", "presence_penalty"]


@pytest.fixture(scope="module")
def served(model):
    with serving(model, parallel=2, n_ctx=512) as running:
        yield running


# --- 1. bounds on every numeric input ----------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(NUMERIC_FIELDS), value=EXTREME)
def test_extreme_values_in_python_are_invalid_config_or_work(context, field, value):
    options = {"max_tokens": 2, field: value}
    try:
        with context.generate_stream("Hi", **options) as stream:
            for token in stream:
                if token.index == 2:  # a valid large max_tokens: a few tokens show it works
                    break
    except mullama.InvalidConfigError as exc:
        assert field in str(exc)
    except mullama.StreamTimeoutError:
        assert field == "timeout_ms"  # a valid, tiny timeout


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["max_tokens", "temperature", "top_k", "top_p", "min_p", "seed", "repeat_penalty",
                              "frequency_penalty", "presence_penalty"]), value=EXTREME)
def test_extreme_values_over_http_are_4xx_and_the_server_keeps_serving(served, field, value):
    server, engine = served
    body = {"prompt": "Hi", "max_tokens": 2, "stream": True, field: value}
    text = json.dumps(body, allow_nan=True)  # NaN/Infinity as Python's json writes them
    with httpx.stream("POST", server.url + "/v1/completions", content=text, timeout=60,
                      headers={"Content-Type": "application/json"}) as response:
        assert response.status_code in (200, 400), (field, value, response.read())
        for index, _line in enumerate(response.iter_lines()):
            if index == 4:  # a valid large max_tokens: a few events show it works; then hang up
                break
    assert engine.alive


def test_the_first_finding_no_longer_kills_the_engine(served):
    server, engine = served
    for route, body in (("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "top_k": 2147483648}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                  "max_tokens": 1, "top_k": 2147483648, "stream": True}),
                        ("/v1/completions", {"prompt": "Hi", "max_tokens": 1, "top_k": 10**6})):
        response = httpx.post(server.url + route, json=body, timeout=60)
        assert response.status_code == 400 and "top_k" in response.json()["error"]["message"]
    answer = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert answer.status_code == 200 and engine.alive
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("options", [{"n_ctx": 2**32}, {"n_threads": 2**31}, {"seed": 2**64}, {"n_batch": 2**40}])
def test_context_refuses_values_beyond_c_ranges(model, options):
    with pytest.raises(mullama.InvalidConfigError) as info:
        mullama.Context(model, **options)
    assert next(iter(options)) in str(info.value)


def test_top_k_and_repeat_last_n_are_bounded_by_the_model_and_context(model):
    with mullama.Context(model, n_ctx=512) as ctx:
        with pytest.raises(mullama.InvalidConfigError, match="top_k"):
            ctx.generate_stream("Hi", top_k=model.vocab_size + 1)
        with pytest.raises(mullama.InvalidConfigError, match="repeat_last_n"):
            ctx.generate_stream("Hi", repeat_last_n=ctx.n_ctx + 1)
        assert ctx.generate("Hi", max_tokens=2, top_k=model.vocab_size).token_ids


# --- 2. malformed JSON is a 400, a WebSocket protocol violation a close frame -----------------
@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"prompt": "Hi", "x": ' + b"[" * 990 + b"]" * 990 + b"}",
                                  b'{"prompt": "Hi", "x": ' + b"[" * 5000])
def test_deeply_nested_json_is_a_400(served, body):
    server, _engine = served
    response = httpx.post(server.url + "/v1/completions", content=body,
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_websocket_deep_json_and_binary_frames(served):
    server, _engine = served
    url = server.url.replace("http", "ws") + "/v1/ws"

    async def scenario():
        async with websockets.connect(url) as ws:
            await ws.send("[" * 100_000)
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and "nested too deeply" in error["error"]["message"]
            await ws.send(json.dumps({"prompt": "Hi", "max_tokens": 2}))  # still usable
            while (message := json.loads(await ws.recv()))["type"] == "token":
                pass
            assert message["type"] == "done"
            await ws.send(b"\x00\x01binary")
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            return info.value.rcvd.code

    assert asyncio.run(scenario()) == 1003


@pytest.mark.parametrize("frame", ["text", "binary"])
def test_websocket_messages_over_the_body_limit_close_with_1009(served, frame):
    """The app refuses a message over its body limit itself (1009, "message too big"), whatever
    ASGI server runs it: this in-process uvicorn lets messages of up to 16 MiB through."""
    server, _engine = served
    url = server.url.replace("http", "ws") + "/v1/ws"
    text = json.dumps({"prompt": "é" * (600 * 1024), "max_tokens": 2})  # 600 Ki characters, 1.2 MiB of UTF-8

    async def scenario():
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(text if frame == "text" else text.encode())
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            return info.value.rcvd.code

    assert asyncio.run(scenario()) == 1009


# --- 3. rendering and tokenising never block the event loop ----------------------------------
def test_health_answers_while_a_huge_prompt_is_prepared(served):
    """Tokenising 80,000 special tokens takes llama.cpp tens of seconds (its partition of the text is
    quadratic in them, upstream's server alike); meanwhile the event loop answers /health all along
    (before templating and tokenising ran on a worker thread, no answer came for 12 s)."""
    server, _engine = served
    prompt = "<|im_start|>" * 80_000  # ~1 MiB of special-token text (the body limit is 1 MiB)
    posting = threading.Event()
    done = threading.Event()
    answered = []  # /health answers received while the request was open

    def poll():
        while not done.is_set():
            httpx.get(server.url + "/health", timeout=30).raise_for_status()
            if posting.is_set() and not done.is_set():
                answered.append(1)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        posting.set()
        response = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
            "messages": [{"role": "user", "content": prompt}], "max_tokens": 1})
    finally:
        done.set()
        poller.join()
    assert response.status_code == 400  # far beyond the context, refused after tokenising
    # a blocked loop answers the poll sent before it blocked and the next one after: never ten
    assert len(answered) >= 10, len(answered)


def test_a_rendered_prompt_beyond_the_limit_is_a_413(model):
    settings = ServerSettings(model_name="m", max_prompt_chars=1000)
    with serving(model, settings=settings, parallel=1, n_ctx=512) as (server, _engine):
        response = httpx.post(server.url + "/v1/completions", json={"prompt": "x" * 2000, "max_tokens": 1})
        assert response.status_code == 413 and "1000" in response.json()["error"]["message"]


# --- 5. a non-streamed request stops when its client goes away ----------------------------------
def test_non_streamed_requests_are_cancelled_on_disconnect(served):
    server, engine = served
    body = json.dumps({"prompt": "Write a long story:", "max_tokens": 400, "ignore_eos": True}).encode()
    cancelled = engine.stats["requests_cancelled"]
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            wait_for(lambda: engine.active_streams > 0, timeout=300)
    wait_for(lambda: engine.active_streams == 0 and engine.waiting == 0, timeout=300)
    assert engine.stats["requests_cancelled"] == cancelled + 2  # stopped because their clients left, not at the end


# --- 9. fork ---------------------------------------------------------------------------------
FORK = textwrap.dedent("""
    import os, sys
    import mullama
    model = mullama.Model.load(sys.argv[1])
    ctx = mullama.Context(model, n_ctx=512)
    ctx.generate("Hi", max_tokens=2)
    pid = os.fork()
    if pid == 0:
        try:
            ctx.generate("Hi", max_tokens=2)
            print("inherited context decoded", flush=True)
        except mullama.ClosedError as exc:
            print("child:", exc.code, "fork()" in str(exc), flush=True)
        fresh = mullama.Context(model, n_ctx=512)  # the inherited model works, with new threads
        print("child tokens:", len(fresh.generate("Hi", max_tokens=3).token_ids), flush=True)
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    print("child exit:", os.waitstatus_to_exitcode(status), flush=True)
    print("parent tokens:", len(ctx.generate("Hi", max_tokens=3).token_ids), flush=True)
    if os.fork() == 0:
        sys.exit(0)  # a child that only exits
    _, status = os.wait()
    print("second child exit:", os.waitstatus_to_exitcode(status), flush=True)
""")


def test_fork_after_load(model_path):
    result = subprocess.run([sys.executable, "-c", FORK, str(model_path)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert "child: CLOSED True" in lines
    assert "child tokens: 3" in lines and "child exit: 0" in lines
    assert "parent tokens: 3" in lines and "second child exit: 0" in lines


# --- 10. absurd sizes fail before allocating ---------------------------------------------------
def test_a_context_beyond_memory_fails_at_once(model):
    with pytest.raises(mullama.ContextError) as info:
        mullama.Context(model, n_ctx=10**9)
    # refused by the KV cache's estimate, before llama.cpp allocates (it took 7 s and ~4 GB to fail)
    assert info.value.code == "CONTEXT_ERROR" and "GiB for its KV cache" in str(info.value)
    with pytest.raises(mullama.ContextError):
        Engine(model, parallel=64, n_ctx=10**7)


def test_stream_config_bounds_name_the_field():
    for field, value in (("max_tokens", 2**31), ("top_k", 2**31), ("buffer_size", 10**7),
                         ("timeout_ms", 10**12), ("repeat_last_n", 2**31), ("stop_sequences", ["x" * 1001])):
        with pytest.raises(mullama.InvalidConfigError, match=field):
            StreamConfig(**{field: value})
