"""A lost RPC server under ``Model.load(rpc_servers=...)``: the caller gets RpcServerLostError
(``RPC_SERVER_LOST``) and the process lives on (ggml would abort it: mullama.native._rpc_relay).

Each run is a child process, as in tests/test_rpc.py (a ggml-rpc-server serves one client at a time;
ggml keeps its registration of a server for the life of the process). The test kills the server at a
point the child announces (a line on its standard output), never after a sleep."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
import textwrap
import threading

from test_rpc import RPCServer

CHILD_HELPERS = textwrap.dedent("""
    def lost(exc):  # what the test reads: the code, whether the message names the server, and says what to do
        print("lost", exc.code, {address!r} in str(exc), "restart" in str(exc) and "load the model again" in str(exc),
              flush=True)

    def local_run():  # afterwards the process goes on: a CPU-only model loads and generates
        with mullama.Model.load({path!r}) as local, mullama.Context(local, n_ctx=256) as context:
            print("local", json.dumps(context.generate("The capital of France is", max_tokens=4).text), flush=True)
""")


def run_losing_child(build, model_path, body: str) -> list[str]:
    """Run ``body`` in a child Python with ``model`` loaded over one RPC server (``{address}``), which
    the test kills when the child prints "kill" and starts again on the same port when it prints
    "restart" (each time answering a line on its standard input). Returns the child's lines; it must
    exit 0 (no signal). ``{path}`` and ``{address}`` in ``body`` are the model's and the server's."""
    binary = build.tool("ggml-rpc-server")
    rpc = RPCServer(binary)
    header = "import asyncio, json, sys, mullama\n" + CHILD_HELPERS + \
        "model = mullama.Model.load({path!r}, n_gpu_layers=99, rpc_servers=[{address!r}])\n"
    script = (header + textwrap.dedent(body)).format(path=str(model_path), address=rpc.address)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        assert child.stdout is not None and child.stdin is not None and child.stderr is not None
        for line in child.stdout:
            lines.append(line.strip())
            if lines[-1] in ("kill", "restart"):
                rpc.close()
                if lines[-1] == "restart":
                    rpc = RPCServer(binary, port=rpc.port)
                child.stdin.write("go on\n")
                child.stdin.flush()
        stderr = child.stderr.read()
        assert child.wait(timeout=300) == 0, (lines, stderr[-2000:])
    finally:
        if child.poll() is None:
            child.kill()
        rpc.close()
    return lines


def _check_lost_then_local(lines: list[str]) -> None:
    assert "lost RPC_SERVER_LOST True True" in lines, lines
    assert lines[-1].startswith("local ") and json.loads(lines[-1][6:]), lines


def test_a_lost_rpc_server_under_a_streaming_context_raises_and_the_process_lives(build, model_path):
    """The server is killed while a Context streams from it: the stream raises RpcServerLostError (no
    garbage token after the loss is handed out as if nothing happened), every later generation raises
    it at once, the garbage collector still frees the context and the model, and a CPU-only model then
    runs in the same process."""
    lines = run_losing_child(build, model_path, """
            context = mullama.Context(model, n_ctx=4096)
            try:
                with context.generate_stream("Story:", max_tokens=3000, ignore_eos=True, temperature=0) as stream:
                    for i, token in enumerate(stream):
                        if i == 0:
                            print("kill", flush=True)
                            sys.stdin.readline()  # the server is gone now
                print("no error", flush=True)
            except mullama.MullamaError as exc:
                lost(exc)
            try:
                context.generate("Again", max_tokens=4)
            except mullama.RpcServerLostError as exc:
                lost(exc)
            del stream, context, model  # freed by the garbage collector this time (the next test closes)
            import gc
            from mullama.native._owned import freed_count
            gc.collect()
            print("freed", freed_count["context"], freed_count["model"], flush=True)
            local_run()
        """)
    assert lines.count("lost RPC_SERVER_LOST True True") == 2, lines
    assert "freed 1 1" in lines, lines
    _check_lost_then_local(lines)


def test_a_lost_rpc_server_under_async_model_streams_raises_and_the_process_lives(build, model_path):
    """The same under the batching engine: two AsyncModel streams are under way when the server is
    killed; both end with RpcServerLostError, a new stream raises it too, and the process goes on."""
    lines = run_losing_child(build, model_path, """
            async def consume(stream, first):
                try:
                    async for _ in stream:
                        if first is not None:
                            first.set()
                except mullama.MullamaError as exc:
                    lost(exc)

            async def main():
                async with mullama.AsyncModel(model, parallel=2, n_ctx=4096) as served:
                    first = asyncio.Event()
                    options = dict(max_tokens=3000, ignore_eos=True, temperature=0)
                    streams = [served.generate_stream(prompt, **options) for prompt in ("Story:", "Poem:")]
                    tasks = [asyncio.ensure_future(consume(stream, first)) for stream in streams]
                    await first.wait()
                    print("kill", flush=True)
                    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                    await asyncio.gather(*tasks)
                    await consume(served.generate_stream("Again", max_tokens=4), None)

            asyncio.run(main())
            model.close()
            local_run()
        """)
    assert lines.count("lost RPC_SERVER_LOST True True") == 3, lines
    _check_lost_then_local(lines)


def test_an_rpc_server_lost_between_two_generations_fails_the_next_at_once(build, model_path):
    """Killed while nothing computes: the next generation raises (it does not answer garbage), and so
    does creating a Context; the model still closes, and loading it again works once a server answers
    at that address again (the same greedy tokens)."""
    lines = run_losing_child(build, model_path, """
            context = mullama.Context(model, n_ctx=1024)
            before = context.generate("The capital of France is", max_tokens=8).token_ids
            print("kill", flush=True)
            sys.stdin.readline()
            for attempt in range(2):
                try:
                    context.generate("The capital of France is", max_tokens=8)
                    print("no error", flush=True)
                except mullama.MullamaError as exc:
                    lost(exc)
            try:
                mullama.Context(model, n_ctx=256)
            except mullama.MullamaError as exc:
                lost(exc)
            context.close()
            model.close()
            print("restart", flush=True)
            sys.stdin.readline()
            again = mullama.Model.load({path!r}, n_gpu_layers=99, rpc_servers=[{address!r}])
            with mullama.Context(again, n_ctx=1024) as context:
                after = context.generate("The capital of France is", max_tokens=8).token_ids
            print("same", after == before, flush=True)
            again.close()
            local_run()
        """)
    assert lines.count("lost RPC_SERVER_LOST True True") == 3, lines
    assert "same True" in lines, lines
    _check_lost_then_local(lines)


def _rpc_server_that_dies_at_the_first_allocation() -> tuple[str, threading.Event]:
    """A peer that speaks ggml's RPC protocol 7 (ggml-rpc.cpp's framing: a command byte, a uint64 size,
    the request; an answer of a uint64 size and its bytes) as a server with one device does, until the
    client allocates the first buffer for the weights: then it hangs up, as a server that dies while a
    model loads. Returns its address and an event set when it hung up."""
    hung_up = threading.Event()
    answers = {14: bytes([7, 0, 0, 0]) + bytes(24), 15: struct.pack("<I", 1), 1: struct.pack("<Q", 32),
               2: struct.pack("<Q", 1 << 40), 11: struct.pack("<QQ", 1 << 30, 1 << 30), 13: struct.pack("<Q", 0)}
    listener = socket.create_server(("127.0.0.1", 0))

    def receive(connection: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            part = connection.recv(size - len(data))
            if not part:
                raise ConnectionResetError
            data += part
        return data

    def serve() -> None:
        while not hung_up.is_set():
            connection, _ = listener.accept()
            with connection, contextlib.suppress(OSError):
                while True:
                    command, size = struct.unpack("<BQ", receive(connection, 9))
                    receive(connection, size)
                    if command == 0:  # ALLOC_BUFFER
                        hung_up.set()
                        break
                    if command in answers:
                        connection.sendall(struct.pack("<Q", len(answers[command])) + answers[command])
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}", hung_up


def test_an_rpc_server_lost_while_the_model_loads_is_an_rpc_server_lost_error(model_path):
    """ggml would abort in the middle of loading; Model.load raises RpcServerLostError naming the server
    instead, and the process goes on (in a child: the lost server stays registered in its ggml)."""
    address, hung_up = _rpc_server_that_dies_at_the_first_allocation()
    script = "import json, sys, mullama\n" + CHILD_HELPERS.format(address=address, path=str(model_path)) + \
        textwrap.dedent(f"""
            try:
                mullama.Model.load({str(model_path)!r}, n_gpu_layers=99, rpc_servers=[{address!r}])
                print("loaded", flush=True)
            except mullama.MullamaError as exc:
                lost(exc)
            local_run()
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert hung_up.is_set()
    _check_lost_then_local(done.stdout.splitlines())
