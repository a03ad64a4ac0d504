"""Offloading layers: llama.cpp's RPC backend (two upstream `ggml-rpc-server` processes on 127.0.0.1,
CPU backend) and the GPU flags, which on this CPU-only machine must reach llama.cpp and change
nothing.

A `ggml-rpc-server` serves one client at a time and ggml keeps its connection for the life of the
process, so each RPC run here is a child process: when it exits, the servers are free for the next
(upstream's llama-server included)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import upstream

import mullama
from mullama.generate._context import default_threads

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village by the sea,"]
N_PREDICT = 32


class RPCServer:
    """Upstream's ggml-rpc-server on 127.0.0.1 (CPU backend, one thread)."""

    def __init__(self, binary, port: int | None = None) -> None:
        self.port = port or upstream.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(self.port), "-t", "1"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.process.poll() is None and time.monotonic() < deadline, "ggml-rpc-server did not start"
                time.sleep(0.1)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture(scope="module")
def rpc_servers(build):
    binary = build.tool("ggml-rpc-server")
    assert binary.is_file(), "the test build includes ggml-rpc-server (build_llama.py --rpc)"
    servers = [RPCServer(binary) for _ in range(2)]
    yield [server.address for server in servers]
    for server in servers:
        server.close()


def greedy_in_child(model_path, rpc: list[str] | None) -> list[list[int]]:
    """Greedy token ids of PROMPTS from a child Python, with every layer on ``rpc`` (or none)."""
    script = textwrap.dedent(f"""
        import json, mullama
        model = mullama.Model.load({str(model_path)!r}, n_gpu_layers=99, rpc_servers={rpc!r})
        context = mullama.Context(model, n_ctx=1024)
        results = []
        for prompt in {PROMPTS!r}:
            context.clear()
            results.append(context.generate(prompt, max_tokens={N_PREDICT}, cache_prompt=False).token_ids)
        print(json.dumps(results))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_greedy_over_two_rpc_servers_equals_llama_server_rpc_and_the_local_run(build, model_path, rpc_servers):
    ours = greedy_in_child(model_path, rpc_servers)
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(),
                                  extra=("--rpc", ",".join(rpc_servers), "-ngl", "99"))
    try:
        theirs = [server.greedy(prompt, N_PREDICT)["tokens"] for prompt in PROMPTS]
    finally:
        server.close()
    assert ours == theirs
    with mullama.Model.load(model_path) as model, mullama.Context(model, n_ctx=1024) as context:
        local = []
        for prompt in PROMPTS:
            context.clear()
            local.append(context.generate(prompt, max_tokens=N_PREDICT, cache_prompt=False).token_ids)
    assert ours == local


def test_the_command_line_offloads_to_rpc_servers(rpc_servers, model_path):
    run = subprocess.run([sys.executable, "-m", "mullama", "run", str(model_path), "--raw", "--temp", "0", "-n", "12",
                          "--rpc", ",".join(rpc_servers), "-ngl", "99", "--json", PROMPTS[0]],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    with mullama.Model.load(model_path) as model, mullama.Context(model, n_ctx=1024) as context:
        assert json.loads(run.stdout)["text"] == context.generate(PROMPTS[0], max_tokens=12).text
    info = subprocess.run([sys.executable, "-m", "mullama", "info", "--json", "--rpc", rpc_servers[0]],
                          capture_output=True, text=True, timeout=120)
    devices = json.loads(info.stdout)["devices"]
    (remote,) = [d for d in devices if d["backend"].startswith("RPC")]
    assert remote["description"] == rpc_servers[0] and remote["memory_total"] > 0


def test_an_unreachable_rpc_server_is_a_model_load_error_naming_it(model_path):
    address = f"127.0.0.1:{upstream.free_port()}"
    with pytest.raises(mullama.ModelLoadError, match=address):
        mullama.Model.load(model_path, n_gpu_layers=99, rpc_servers=[address])


def test_a_peer_that_is_not_an_rpc_server_is_refused(model_path):
    with socket.socket() as listener:  # answers anything with a line of text, as an HTTP server might
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"

        def answer() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(64)
                connection.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + b" " * 64)

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(mullama.ModelLoadError, match="does not answer as a ggml RPC server"):
            mullama.Model.load(model_path, n_gpu_layers=99, rpc_servers=[address])


@pytest.mark.parametrize("options, message", [
    ({"rpc_servers": ["nohost"]}, "HOST:PORT"),
    ({"rpc_servers": ["127.0.0.1:0"]}, "port from 1 to 65535"),
    ({"rpc_servers": "127.0.0.1:50052"}, "must be a list"),
    ({"n_gpu_layers": -2}, "n_gpu_layers"),
    ({"n_gpu_layers": True}, "n_gpu_layers"),
    ({"split_mode": "diagonal"}, "split_mode"),
    ({"tensor_split": [1, -1]}, "tensor_split"),
    ({"tensor_split": [0, 0]}, "tensor_split"),
    ({"tensor_split": [float("nan")]}, "tensor_split"),
    ({"tensor_split": [1] * 1000}, "at most"),
    ({"main_gpu": "0"}, "main_gpu"),
])
def test_bad_offload_options_are_invalid_config(model_path, options, message):
    with pytest.raises(mullama.InvalidConfigError, match=message):
        mullama.Model.load(model_path, **options)


def test_gpu_flags_reach_llama_cpp_and_change_nothing_on_a_cpu(model_path):
    """No GPU here: llama.cpp keeps every layer on the CPU whatever -ngl says (as upstream does), so the
    flags must be accepted and the greedy answer must not move."""
    plain = subprocess.run([sys.executable, "-m", "mullama", "run", str(model_path), "--raw", "--temp", "0",
                            "-n", "12", "--json", PROMPTS[0]], capture_output=True, text=True, timeout=300)
    flagged = subprocess.run([sys.executable, "-m", "mullama", "run", str(model_path), "--raw", "--temp", "0",
                              "-n", "12", "--json", "-ngl", "99", "--split-mode", "row", "--tensor-split", "1",
                              "--main-gpu", "0", PROMPTS[0]], capture_output=True, text=True, timeout=300)
    assert plain.returncode == flagged.returncode == 0, flagged.stderr
    assert json.loads(plain.stdout)["text"] == json.loads(flagged.stdout)["text"]
    with mullama.Model.load(model_path, n_gpu_layers=99) as model:
        assert not model.offloaded  # nothing left the CPU: its contexts still take turns on it
    bad = subprocess.run([sys.executable, "-m", "mullama", "run", str(model_path), "--tensor-split", "a,b", "hi"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "--tensor-split" in bad.stderr


def test_info_lists_the_devices():
    info = mullama.system_info()
    (cpu,) = [device for device in info["devices"] if device["type"] == "cpu"]
    assert cpu["name"] == "CPU" and cpu["memory_total"] > 0
    shown = subprocess.run([sys.executable, "-m", "mullama", "info"], capture_output=True, text=True, timeout=120)
    assert "devices:" in shown.stdout and "CPU (cpu, CPU)" in shown.stdout


def test_a_lost_rpc_server_ends_its_stream_with_an_error_and_the_server_recovers(build, model_path):
    """A lost RPC server ends `mullama serve --rpc`'s serving process (its models are of no use any
    more); the supervising process keeps the port, so the stream under way ends with a generation_error event,
    requests meanwhile get a 503 in their API's shape, /health says degraded, and once the RPC
    server is back the next request is served (the same greedy answer as before)."""
    import httpx
    from mullama_server import MullamaServer

    rpc, other = RPCServer(build.tool("ggml-rpc-server")), RPCServer(build.tool("ggml-rpc-server"))
    server = MullamaServer(model_path, parallel=1, ctx_size=1024,
                           extra=("--rpc", f"{rpc.address},{other.address}", "-ngl", "99"))
    try:
        assert "supervised" in server.ready_line
        body = {"prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
        before = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{server.port}/v1/ws") as ws, pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1013 and "--rpc" in closed.value.rcvd.reason
        events = []
        long = {"prompt": "Story:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 5:
                    rpc.close()  # one of the two RPC servers goes away mid-stream
        assert events[-1] != "[DONE]"
        assert json.loads(events[-1])["error"]["code"] == "generation_error"
        health = httpx.get(f"{server.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        refused = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "worker_restarting"
        claude = httpx.post(f"{server.url}/v1/messages", json={"model": "m", "max_tokens": 4, "messages": [
            {"role": "user", "content": "hi"}]}, timeout=30)
        assert claude.status_code == 503 and claude.json()["type"] == "error"
        assert httpx.get(f"{server.url}/health/live", timeout=30).status_code == 200
        rpc = RPCServer(build.tool("ggml-rpc-server"), port=rpc.port)  # back, on the same address
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/health", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the serving process did not come back"
            time.sleep(0.2)
        after = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
        assert after.status_code == 200 and after.json()["choices"][0]["text"] == before
        assert httpx.get(f"{server.url}/health", timeout=30).json()["restarts"] >= 1
        # the serving process ended on purpose, saying why (RpcServerLostError, not an abort in ggml)
        assert any(f"lost the RPC server at {rpc.address}; the serving process ends" in line for line in server.log)
        assert not any("llama.cpp ended the process" in line for line in server.log)
    finally:
        server.close()
        rpc.close()
        other.close()


def test_an_unreachable_rpc_server_at_start_fails_serve_cleanly(model_path):
    address = f"127.0.0.1:{upstream.free_port()}"
    command = [sys.executable, "-m", "mullama", "serve", "--model", str(model_path), "--port",
               str(upstream.free_port()), "--rpc", address, "-ngl", "99"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "MODEL_LOAD_ERROR" in done.stderr and address in done.stderr, done.stderr


def _wait_for_health(server, wanted, timeout: float = 300) -> dict:
    """Wait until ``wanted(health)`` holds for the proxy's /health (the bound only ends a hung test)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.get(f"{server.url}/health", timeout=30)
        health = {**answer.json(), "http_status": answer.status_code}
        if wanted(health):
            return health
        assert time.monotonic() < deadline, f"/health never reached the wanted state: {health}"
        time.sleep(0.05)


def test_the_rpc_proxy_streams_bodies_and_forwards_a_client_that_leaves(build, model_path):
    """The supervising proxy passes a body on as it comes: a 64 MB body is refused (413) by the child
    after reading only its limit, and the proxy never holds it (its memory stays flat); a client of a
    non-streamed answer that leaves closes the request to the child, which stops generating."""
    import http.client

    import httpx
    from mullama_server import MullamaServer

    rpc = RPCServer(build.tool("ggml-rpc-server"))
    server = MullamaServer(model_path, parallel=1, ctx_size=1024, extra=("--rpc", rpc.address, "-ngl", "99"))
    try:
        assert "supervised" in server.ready_line
        proxy_heap = server.rss_mb("RssAnon")

        def chunks():
            for _ in range(64):
                yield b" " * (1 << 20)

        for headers in ({"Content-Length": str(64 << 20)}, {}):  # with its length, and chunked
            refused = httpx.post(f"{server.url}/v1/completions", content=chunks(),
                                 headers={"Content-Type": "application/json", **headers}, timeout=120)
            assert refused.status_code == 413, refused.text
        assert server.rss_mb("RssAnon") < proxy_heap + 30, (proxy_heap, server.rss_mb("RssAnon"))

        long = json.dumps({"prompt": "Story:", "max_tokens": 2000, "ignore_eos": True, "temperature": 0})
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        connection.request("POST", "/v1/completions", body=long, headers={"Content-Type": "application/json"})
        _wait_for_health(server, lambda health: health.get("active_streams") == 1)
        connection.close()  # the client leaves before its answer
        _wait_for_health(server, lambda health: health.get("active_streams") == 0)
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        assert "mullama_requests_cancelled_total 1" in metrics.splitlines()
        after = httpx.post(f"{server.url}/v1/completions", timeout=120,
                           json={"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
        assert after.status_code == 200 and after.json()["choices"][0]["text"]
    finally:
        server.close()
        rpc.close()


def test_the_supervisor_backs_off_and_gives_up_after_its_restart_limit(build, model_path):
    """With its RPC server gone for good, the serving process cannot start again: /health says
    degraded with the failed starts and the wait before the next, then the supervisor gives up after
    --restart-limit starts in a row and exits 1 saying why (not retrying for ever)."""
    import httpx
    from mullama_server import MullamaServer

    rpc = RPCServer(build.tool("ggml-rpc-server"))
    server = MullamaServer(model_path, parallel=1, ctx_size=1024,
                           extra=("--rpc", rpc.address, "-ngl", "99", "--restart-limit", "2"))
    try:
        rpc.close()  # gone for good: the next computation ends the serving process
        lost = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=120)
        assert lost.status_code in (500, 503), lost.text
        seen = []  # /health answers after a failed start, until the supervisor exits
        while server.process.poll() is None:
            try:
                health = httpx.get(f"{server.url}/health", timeout=30)
            except httpx.TransportError:
                break
            if health.json().get("failed_starts", 0) >= 1:
                seen.append(health)
            time.sleep(0.05)
        assert server.process.wait(timeout=300) == 1
        assert seen, "/health never showed a failed start"
        assert all(health.status_code == 503 and health.json()["status"] in ("degraded", "failed")
                   and health.json()["restart_limit"] == 2 for health in seen)
        assert any(rpc.address in health.json()["error"] for health in seen), seen[-1].json()
        assert any("gave up after 2 failed starts in a row" in line for line in server.log), "\n".join(server.log)
    finally:
        if server.process.poll() is None:
            server.process.kill()
        rpc.close()
