"""A local HTTP server with Hugging Face's URL layout, serving real bytes, for download tests.

    /{owner}/{repo}/resolve/{revision}/{file}   GET (with Range) and HEAD (X-Linked-Etag / -Size)
    /api/models/{owner}/{repo}/tree/{revision}   the file list, with LFS sha256 and size

Faults are switched on per file: drop the connection after N bytes, advertise a wrong
digest, or answer 401 (a gated repository). Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class ServedFile:
    path: Path
    sha256: str
    size: int
    drop_after: int | None = None  # close the connection after this many bytes of a GET
    drops_left: int = 0            # ... this many times
    wrong_digest: bool = False
    gated: bool = False


@dataclass
class Request:
    method: str
    path: str
    headers: dict


@dataclass
class HFServer:
    files: dict[str, ServedFile] = field(default_factory=dict)  # "owner/repo/file" -> file
    requests: list[Request] = field(default_factory=list)

    def add(self, repo: str, filename: str, source: Path, **faults) -> ServedFile:
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        served = ServedFile(source, digest, source.stat().st_size, **faults)
        self.files[f"{repo}/{filename}"] = served
        return served

    def start(self) -> str:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                owner.requests.append(Request(self.command, self.path, dict(self.headers)))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    return self._tree("/".join(parts[2:4]))
                if len(parts) >= 5 and parts[2] == "resolve":
                    key = f"{parts[0]}/{parts[1]}/{'/'.join(parts[4:])}"
                    served = owner.files.get(key)
                    if served is None:
                        return self._status(404)
                    if served.gated and "Authorization" not in self.headers:
                        return self._status(401)
                    return self._file(served, body)
                self._status(404)

            def _status(self, code: int):
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _tree(self, repo: str):
                items = [{"type": "file", "path": key.split("/", 2)[2], "size": f.size,
                          "lfs": {"oid": f.sha256, "size": f.size}}
                         for key, f in owner.files.items() if key.startswith(repo + "/")]
                if not items:
                    return self._status(404)
                data = json.dumps(items).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _file(self, served: ServedFile, body: bool):
                digest = "0" * 64 if served.wrong_digest else served.sha256
                start = 0
                range_header = self.headers.get("Range")
                if range_header and range_header.startswith("bytes="):
                    start = int(range_header[6:].split("-")[0])
                if start >= served.size and range_header:
                    return self._status(416)
                self.send_response(206 if range_header else 200)
                self.send_header("X-Linked-Etag", f'"{digest}"')
                self.send_header("X-Linked-Size", str(served.size))
                self.send_header("Content-Length", str(served.size - start))
                if range_header:
                    self.send_header("Content-Range", f"bytes {start}-{served.size - 1}/{served.size}")
                self.end_headers()
                if not body:
                    return
                limit = served.size - start
                if served.drop_after is not None and served.drops_left > 0:
                    served.drops_left -= 1
                    limit = min(limit, served.drop_after)
                    self.close_connection = True
                with open(served.path, "rb") as handle:
                    handle.seek(start)
                    sent = 0
                    while sent < limit:
                        block = handle.read(min(1 << 20, limit - sent))
                        self.wfile.write(block)
                        sent += len(block)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def serve_as_hub(self, monkeypatch, home: Path) -> None:
        """Start, and make this the Hugging Face that mullama's hub reaches (``HF_ENDPOINT``), with an
        empty cache at ``home`` (``MULLAMA_HOME``; the library is loaded first, from the real cache)."""
        from mullama.native import _library

        _library.get()
        monkeypatch.setenv("HF_ENDPOINT", self.start())
        monkeypatch.setenv("MULLAMA_HOME", str(home))
        monkeypatch.delenv("HF_TOKEN", raising=False)

    def gets(self, filename: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + filename)]
