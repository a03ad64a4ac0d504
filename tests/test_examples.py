"""Every example script runs, end to end, on the real model."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from upstream import free_port

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, model_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / name), str(model_path)], capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.parametrize("name, expected", [
    ("basic_streaming.py", "tokens/s]"),
    ("stream_config.py", ""),
    ("async_stream.py", "Tokens/sec:"),
    ("backpressure.py", "ever waiting in the buffer of 8]"),
    ("early_stopping.py", "[stopped after"),
])
def test_script_examples(name, expected, model_path):
    result = run_example(name, model_path)
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
    assert len(result.stdout.strip()) > 20


def test_error_recovery_example_shows_a_timeout(model_path):
    result = run_example("error_recovery.py", model_path)
    assert result.returncode == 0, result.stderr
    assert "Generation timed out" in result.stderr
    assert "Paris" in result.stdout


class ExampleServer:
    def __init__(self, name: str, model_path: Path) -> None:
        self.port = free_port()
        env = dict(os.environ, HOST="127.0.0.1", PORT=str(self.port))
        self.process = subprocess.Popen([sys.executable, str(EXAMPLES / name), str(model_path)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_port(self) -> None:
        import socket

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.process.stdout.read()
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError("the example server did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def test_sse_example_emits_valid_json(model_path):
    server = ExampleServer("sse_fastapi.py", model_path)
    try:
        server.wait_port()
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/generate",
                                         data=json.dumps({"prompt": "Write a haiku about 東京 and 🍕:",
                                                          "max_tokens": 40}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            body = response.read().decode("utf-8")
    finally:
        server.close()
    events = [block for block in body.split("\n\n") if block]
    assert events[-1] == "data: [DONE]"
    texts = []
    for event in events[:-1]:
        assert event.startswith("data: ")
        texts.append(json.loads(event[len("data: "):])["text"])  # every event is valid JSON
    assert 0 < len(texts) <= 40
    assert "".join(texts).strip()


def test_websocket_example_streams_tokens_then_done(model_path):
    import websockets

    server = ExampleServer("websocket_server.py", model_path)
    try:
        server.wait_port()

        async def talk():
            async with websockets.connect(f"ws://127.0.0.1:{server.port}") as ws:
                results = []
                for prompt in ("Hello there,", "The weather today"):
                    await ws.send(prompt)
                    messages = []
                    while True:
                        message = json.loads(await ws.recv())
                        messages.append(message)
                        if message["type"] == "done":
                            break
                    results.append(messages)
                return results

        results = asyncio.run(talk())
    finally:
        server.close()
    for messages in results:
        assert messages[-1]["type"] == "done"
        tokens = [m for m in messages if m["type"] == "token"]
        assert messages[-1]["tokens"] == len(tokens) > 0
