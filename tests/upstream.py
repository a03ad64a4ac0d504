"""Upstream llama.cpp tools, built from the pin against the same ggml build, for reference outputs.

Nothing here is a mock: it starts the real ``llama-server`` built by ``build_llama.py
--tools`` on 127.0.0.1 and asks it for completions, so reference tokens are computed
on this machine, from this build, at test time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.append(str(REPO))  # build_llama, tests helpers; an installed mullama wins over the source tree

import build_llama

TOOLS = ("llama-server", "llama-bench", "llama-simple", build_llama.RPC_SERVER)


def build_with_tools() -> build_llama.BuildResult:
    """The default build (what mullama loads), with the upstream tools beside it."""
    return build_llama.build(build_llama.BuildOptions(), tools=TOOLS)


def template_path(build: build_llama.BuildResult, name: str) -> Path:
    """One of upstream's chat templates (models/templates), from the source tree ``build`` was made from."""
    path = Path(build.manifest["source"]) / "models" / "templates" / name
    assert path.is_file(), path
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """A running upstream llama-server on 127.0.0.1."""

    def __init__(self, binary: Path, model: Path | None, *, threads: int, n_ctx: int = 4096,
                 parallel: int = 1, extra: tuple[str, ...] = ()) -> None:
        """``model`` None: router mode (``extra`` names the models, e.g. ``--models-dir``)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(binary), *(["-m", str(model)] if model is not None else []), "--host", "127.0.0.1",
                   "--port", str(self.port), "-t", str(threads), "-c", str(n_ctx), "-np", str(parallel),
                   "--no-webui", *extra]
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"llama-server exited: {self.log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError("llama-server did not become ready")

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.loads(response.read())

    def greedy(self, prompt: str, n_predict: int, *, penalties: dict | None = None, **fields) -> dict:
        """Greedy completion of ``prompt``: ``tokens`` (ids), ``content``, ``stop_type``.
        ``penalties`` (llama-server's repeat_penalty, repeat_last_n, frequency_penalty,
        presence_penalty) apply before the greedy pick; other ``fields`` go into the request as they are."""
        samplers = ["penalties", "top_k", "temperature"] if penalties else ["top_k", "temperature"]
        return self.post("/completion", {
            "prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "top_k": 1,
            "cache_prompt": False, "return_tokens": True, "samplers": samplers, **(penalties or {}), **fields,
        })

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
