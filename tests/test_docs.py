"""Every Python code block of docs/ and the README runs, as written, on the real model.

Blocks run in a directory holding `model.gguf` (the real default model) and `templates/` (llama.cpp's
models/templates from the pinned source, for the tool-calling guide), as the docs say.
Server-side blocks (a FastAPI app, a WebSocket handler) are loaded without their
serve-forever entry point, served on a free port, and talked to by a real client; client
blocks that name `127.0.0.1:8080` talk to a real `mullama serve` on the port it got.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mullama_server import MullamaServer
from upstream import template_path

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

FASTAPI_HARNESS = """
import json, runpy, sys, threading, time, urllib.request
import uvicorn
namespace = runpy.run_path("block.py", run_name="docs_block")
port = int(sys.argv[1])
server = uvicorn.Server(uvicorn.Config(namespace["app"], host="127.0.0.1", port=port, log_level="warning"))
thread = threading.Thread(target=server.run, daemon=True)
thread.start()
while not server.started:
    time.sleep(0.05)
request = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps({"prompt": "Hi 🍕"}).encode(),
                                 headers={"Content-Type": "application/json"})
body = urllib.request.urlopen(request, timeout=120).read().decode()
events = [e for e in body.split("\\n\\n") if e]
assert events[-1] == "data: [DONE]", events[-1]
texts = [json.loads(e[6:])["text"] for e in events[:-1]]
print("events", len(texts), "".join(texts)[:60])
server.should_exit = True
thread.join(10)
"""

WEBSOCKET_HARNESS = """
import asyncio, json, runpy, sys
import websockets
namespace = runpy.run_path("block.py", run_name="docs_block")
port = int(sys.argv[1])

async def main():
    async with websockets.serve(namespace["handler"], "127.0.0.1", port):
        async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
            await ws.send("Hello there")
            messages = []
            while not messages or messages[-1]["type"] != "done":
                messages.append(json.loads(await ws.recv()))
            print("messages", len(messages))
            assert messages[-1] == {"type": "done"} and len(messages) > 1

asyncio.run(main())
"""


def blocks() -> list[tuple[str, int, str]]:
    found = []
    for path in [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]:
        for i, match in enumerate(BLOCK.finditer(path.read_text())):
            found.append((path.name, i, match.group(1)))
    return found


@pytest.fixture(scope="module")
def docs_server(model_path, build, tmp_path_factory):
    # With upstream's Qwen 2.5 template, as docs/tools.md says: its tool-calling block talks to this server.
    # And a --slot-save-path, for docs/server.md's saved slots.
    template = template_path(build, "Qwen-Qwen2.5-7B-Instruct.jinja")
    server = MullamaServer(model_path, parallel=2, ctx_size=1024,
                           extra=("--chat-template-file", str(template),
                                  "--slot-save-path", str(tmp_path_factory.mktemp("slots"))))
    yield server
    server.close()


def _made_by_tool(tool: str, out: Path, *options: str) -> Path:
    """``out``, written by ``tools/<tool> OUT [options]``, as a doc page has its reader do."""
    subprocess.run([sys.executable, str(REPO / "tools" / tool), str(out), *options], check=True,
                   capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def reranker_path(tmp_path_factory) -> Path:
    """The reranker docs/embeddings.md has its reader write with tools/make_rank_model.py."""
    return _made_by_tool("make_rank_model.py", tmp_path_factory.mktemp("reranker") / "reranker.gguf")


@pytest.fixture(scope="module")
def adapter_path(tmp_path_factory, model_path) -> Path:
    """The LoRA adapter docs/lora.md has its reader write with tools/make_lora.py."""
    return _made_by_tool("make_lora.py", tmp_path_factory.mktemp("lora") / "adapter.gguf", "--for", str(model_path))


@pytest.fixture(scope="module")
def draft_path(tmp_path_factory, model_path) -> Path:
    """The draft model docs/speculative.md has its reader write with tools/make_draft_model.py."""
    return _made_by_tool("make_draft_model.py", tmp_path_factory.mktemp("draft") / "draft.gguf", "--for",
                         str(model_path))


@pytest.fixture(scope="module")
def mmproj_path(tmp_path_factory, model_path) -> Path:
    """The projector docs/vision.md has its reader write with tools/make_test_mmproj.py."""
    return _made_by_tool("make_test_mmproj.py", tmp_path_factory.mktemp("mmproj") / "mmproj.gguf", "--for",
                         str(model_path))


@pytest.fixture(scope="module")
def audio_mmproj_path(tmp_path_factory, model_path) -> Path:
    """The audio projector docs/vision.md has its reader write with tools/make_test_mmproj.py --audio."""
    return _made_by_tool("make_test_mmproj.py", tmp_path_factory.mktemp("mmproj") / "audio-mmproj.gguf", "--audio",
                         "--for", str(model_path))


@pytest.fixture(scope="module")
def qwen2vl_paths(tmp_path_factory, model_path) -> tuple[Path, Path]:
    """The M-RoPE model and projector docs/vision.md has its reader write with tools/make_mrope_model.py and
    tools/make_test_mmproj.py --kind qwen2vl."""
    directory = tmp_path_factory.mktemp("qwen2vl")
    model = _made_by_tool("make_mrope_model.py", directory / "qwen2vl.gguf", "--for", str(model_path))
    return model, _made_by_tool("make_test_mmproj.py", directory / "qwen2vl-mmproj.gguf", "--kind", "qwen2vl",
                                "--for", str(model))


@pytest.mark.parametrize("name, index, code", blocks(), ids=[f"{n}#{i}" for n, i, _ in blocks()])
def test_docs_block_runs(name, index, code, tmp_path, model_path, build, request):
    from upstream import free_port

    (tmp_path / "model.gguf").symlink_to(model_path)
    (tmp_path / "templates").symlink_to(template_path(build, "Qwen-Qwen2.5-7B-Instruct.jinja").parent)
    if "reranker.gguf" in code:
        (tmp_path / "reranker.gguf").symlink_to(request.getfixturevalue("reranker_path"))
    if "adapter.gguf" in code:
        (tmp_path / "adapter.gguf").symlink_to(request.getfixturevalue("adapter_path"))
    if "draft.gguf" in code:
        (tmp_path / "draft.gguf").symlink_to(request.getfixturevalue("draft_path"))
    if re.search(r"(?<![\w-])mmproj\.gguf", code):  # not audio-mmproj.gguf
        (tmp_path / "mmproj.gguf").symlink_to(request.getfixturevalue("mmproj_path"))
    if "qwen2vl.gguf" in code:
        for made in request.getfixturevalue("qwen2vl_paths"):
            (tmp_path / made.name).symlink_to(made)
    if "audio-mmproj.gguf" in code:
        (tmp_path / "audio-mmproj.gguf").symlink_to(request.getfixturevalue("audio_mmproj_path"))
    if "speech.mp3" in code:  # docs/vision.md's clip: the pinned tree's test clip
        (tmp_path / "speech.mp3").symlink_to(Path(build.manifest["source"]) / "tools" / "mtmd" / "test-2.mp3")
    if "photo.jpeg" in code:  # docs/vision.md's picture: the pinned tree's test image
        (tmp_path / "photo.jpeg").symlink_to(Path(build.manifest["source"]) / "tools" / "mtmd" / "test-1.jpeg")
    if "127.0.0.1:8080" in code:
        server = request.getfixturevalue("docs_server")
        code = code.replace("127.0.0.1:8080", f"127.0.0.1:{server.port}")
    (tmp_path / "block.py").write_text(code)
    if "FastAPI(" in code:
        script = ["-c", FASTAPI_HARNESS, str(free_port())]
    elif "websockets.serve(" in code:
        script = ["-c", WEBSOCKET_HARNESS, str(free_port())]
    else:
        script = ["block.py"]
    result = subprocess.run([sys.executable, *script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), check=False)
    assert result.returncode == 0, f"{name} block {index} failed:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"{name} block {index} printed nothing"


def test_every_doc_page_has_runnable_python():
    pages = {name for name, _, _ in blocks()}
    assert {"streaming.md", "server.md", "models.md", "troubleshooting.md", "README.md", "vision.md"} <= pages
    assert len(blocks()) >= 15
    json.dumps(pages and sorted(pages))
