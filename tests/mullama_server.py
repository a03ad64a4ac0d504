"""Start a real ``mullama serve`` process on 127.0.0.1 for tests and benchmarks."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from upstream import free_port


class MullamaServer:
    def __init__(self, model: Path | str | None, *, parallel: int = 4, ctx_size: int = 1024, threads: int | None = None,
                 extra: tuple[str, ...] = (), env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "mullama", "serve", *(["--model", str(model)] if model is not None else []),
                   "--port", str(self.port), "--parallel", str(parallel), "--ctx-size", str(ctx_size), *extra]
        if threads:
            command += ["--threads", str(threads)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, **(env or {})))
        self.ready_line = self.process.stdout.readline()
        if "serving" not in self.ready_line:
            self.process.kill()
            raise RuntimeError(f"mullama serve did not start: {self.ready_line}{self.process.stdout.read()}")
        # The server writes an access-log line per request: read them all, or the pipe fills and blocks it.
        self.log: collections.deque[str] = collections.deque(maxlen=10_000)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.log.append(line.rstrip("\n"))

    def get_json(self, path: str, headers: dict | None = None) -> dict:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until /health reports no active stream (the bound only ends a hung test)."""
        deadline = time.monotonic() + timeout
        while self.get_json("/health")["active_streams"]:
            assert time.monotonic() < deadline, "streams still active"
            time.sleep(0.02)

    def metric(self, name: str) -> float:
        """One value of the server's /metrics (Prometheus text)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=60) as response:
            text = response.read().decode()
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert found, f"{name} missing from /metrics"
        return float(found.group(1))

    def rss_mb(self, kind: str = "VmRSS") -> float:
        """Resident MB of the server process: ``VmRSS`` (all), ``RssAnon`` (heap and buffers: without swap
        never evicted, so steady beside other busy processes) or ``RssFile`` (mapped files, which the kernel
        may drop and read back at any time)."""
        for line in open(f"/proc/{self.process.pid}/status"):
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(kind)

    def maps(self, path: Path) -> bool:
        """Whether the server has ``path`` (a model file it mmaps) mapped now."""
        name = str(path.resolve())
        with open(f"/proc/{self.process.pid}/maps") as maps:
            return any(line.rstrip("\n").endswith(name) for line in maps)

    def close(self) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
