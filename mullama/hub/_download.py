"""Resumable, verified downloads: a URL streamed into ``<file>.part``, checked against its sha256.

A transfer that breaks keeps what it has and is resumed with an HTTP Range request;
connection errors and 5xx/429 answers are retried with exponential backoff; a full disk
is a clear error that keeps the partial file. The caller renames the verified ``.part``.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from .._exceptions import DownloadError

__all__ = ["CHUNK", "RETRIES", "download", "sha256_file", "with_retries"]

CHUNK = 1 << 20
RETRIES = 4

StatusCheck = Callable[[Any, str], None]  # (response, label): raises a MullamaError for a 4xx/5xx answer

# Who else hears of a download's progress, as (label, total bytes, bytes done): the server's /api/pull
# streams it. A context variable, so a download in a worker thread reports to the request that started it.
progress_listener: ContextVar[Callable[[str, int, int], None] | None] = ContextVar("progress_listener", default=None)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            hasher.update(block)
    return hasher.hexdigest()


def with_retries(call: Callable, attempts: int = RETRIES):
    """``call()``, retried with exponential backoff on connection errors and 5xx/429 answers."""
    import requests

    for attempt in range(attempts):
        try:
            response = call()
        except (requests.ConnectionError, requests.Timeout):
            if attempt == attempts - 1:
                raise
        else:
            if response.status_code not in (429, 500, 502, 503, 504) or attempt == attempts - 1:
                return response
        time.sleep(min(8.0, 0.5 * 2 ** attempt))


def _check_disk_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise DownloadError(f"not enough disk space in {directory}: {needed / 1e9:.2f} GB more needed, "
                            f"{free / 1e9:.2f} GB free. Free some space or set MULLAMA_HOME to a larger disk.")


def download(url: str, part: Path, sha256: str, size: int | None, label: str, *,
             check_status: StatusCheck, headers: dict | None = None, quiet: bool) -> None:
    """Stream ``url`` into ``part`` (resuming what is there), then verify its sha256.

    A transfer that fails keeps ``part`` for the next attempt to resume. If a resumed file
    fails verification (its first part was corrupt), it is downloaded once more from the start;
    a fresh download that fails verification is deleted.
    """
    resumed = part.exists() and part.stat().st_size > 0
    _transfer(url, part, size, label, check_status=check_status, headers=headers, quiet=quiet)
    actual = sha256_file(part)
    if actual != sha256 and resumed:
        print(f"mullama: the resumed download of {label} did not verify; downloading it again from the start",
              file=sys.stderr)
        part.unlink(missing_ok=True)
        _transfer(url, part, size, label, check_status=check_status, headers=headers, quiet=quiet)
        actual = sha256_file(part)
    if actual != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{label} does not match its sha256 (got {actual}, expected {sha256}); "
                            "the download was deleted. Run the command again; if it fails again, the source "
                            "changed.")


def _transfer(url: str, part: Path, size: int | None, label: str, *, check_status: StatusCheck,
              headers: dict | None, quiet: bool) -> None:
    """Bring ``part`` up to the full file, resuming and retrying transient errors."""
    import requests

    for attempt in range(RETRIES):
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        if size is not None and have == size:
            return
        if size is not None:
            _check_disk_space(part.parent, size - have)
        request_headers = dict(headers or {})
        if have:
            request_headers["Range"] = f"bytes={have}-"
        try:
            with requests.get(url, headers=request_headers, stream=True, timeout=60) as response:
                if response.status_code == 416 and have:  # the server has nothing past what we hold
                    return
                if response.status_code >= 400:
                    check_status(response, label)
                if response.status_code == 200 and have:
                    have = 0  # the server ignored the range: start over
                total = size or (have + int(response.headers.get("Content-Length", 0) or 0))
                with open(part, "ab" if have else "wb") as out, _progress(label, total, have, quiet) as advance:
                    for block in response.iter_content(CHUNK):
                        out.write(block)
                        advance(len(block))
            if size is None or part.stat().st_size >= size:
                return
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if attempt == RETRIES - 1:
                held = part.stat().st_size if part.exists() else 0
                raise DownloadError(f"downloading {label} failed: {exc}. {held} bytes are kept in {part}; "
                                    "run the same command again to resume.") from exc
            time.sleep(min(8.0, 0.5 * 2 ** attempt))
        except OSError as exc:  # the disk: full, read-only, file too large
            held = part.stat().st_size if part.exists() else 0
            raise DownloadError(f"cannot write {part}: {exc.strerror or exc}. {held} bytes are kept; free some "
                                "disk space (or set MULLAMA_HOME to a larger disk) and run the command again to "
                                "resume.") from exc


@contextlib.contextmanager
def _progress(label: str, total: int, done: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A function to call with each block's size: it shows the transfer and tells ``progress_listener``."""
    listener = progress_listener.get()
    with _shown_progress(label, total, done, quiet) as show:
        if listener is None:
            yield show
            return
        listener(label, total, done)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            show(n)
            listener(label, total, done)

        yield advance


@contextlib.contextmanager
def _shown_progress(label: str, total: int, done: int, quiet: bool) -> Iterator[Callable[[int], None]]:
    if quiet or not sys.stderr.isatty():
        if not quiet:
            print(f"mullama: downloading {label}, {total / 1e6:.0f} MB", file=sys.stderr, flush=True)
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=False) as progress:
        task = progress.add_task(f"pulling {label}", total=total, completed=done)
        yield lambda n: progress.advance(task, n)
