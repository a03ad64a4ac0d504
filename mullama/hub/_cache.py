"""The cache of downloaded models: where a verified file lives, and the index of what is there.

Each model has a directory under ``models_dir()`` (``model_path``); ``index.json`` beside them records,
per name, the file, its size, its sha256, where it came from and when, and for a Hugging Face model
its multimodal projector (``"projector"``: None when the repository has none; a projector whose file
is missing did not finish downloading) (``list_models``; ``remove`` deletes a model, its projector and
their partial downloads: they share the directory). The index is rewritten whole, under a file lock, and
replaced atomically; ``_locked`` is the same lock the downloads (``_pull``) take per file. Nothing
here downloads: ``cached`` answers whether a name has been pulled.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .._exceptions import ModelNotFoundError
from .._paths import models_dir
from ._catalog import HFFile, RegistryEntry, entry_for, hf_prefix, parse_hf, pick_gguf

__all__ = ["CachedModel", "CachedProjector", "cache_name", "cached", "list_models", "model_path", "projector_of",
           "remove"]

INDEX_FILE = "index.json"


def model_path(entry: RegistryEntry) -> Path:
    """Where the verified file of ``entry`` lives in the cache: a directory per name (a Hugging Face
    name's directory ends with a digest of the whole name, revision and file included, so that no two
    names share one and none is too long for the file system)."""
    source = entry.sources[0] if entry.sources else None
    if entry.name.startswith("hf:") and isinstance(source, HFFile):
        digest = hashlib.sha256(entry.name.encode()).hexdigest()[:16]
        safe = f"hf-{source.repo.replace('/', '--')}-{digest}"
    else:
        safe = entry.name.replace(":", "-").replace("/", "_").replace("@", "_")
    return models_dir() / safe / entry.filename


def cached(name: str) -> Path | None:
    """The cached file of a model name, or None when it has not been pulled (never downloads)."""
    key = cache_name(name)
    if key is None:
        return None
    if key.startswith("hf:"):
        return next((m.path for m in list_models() if m.name == key), None)
    path = model_path(entry_for(key))
    return path if path.is_file() else None


def cache_name(name: str) -> str | None:
    """The name the cache knows a model by, for a name as every command takes it: a name with or
    without its tag (``all-minilm`` is ``all-minilm:l6-v2``), in any case; a Hugging Face name, where
    one without its file (``hf:owner/repo``) means a file pulled from that repository: the
    quantisation ``choose_gguf`` prefers among those pulled. None for a name that means no model
    (never asks the network). The one resolution of ``cached``, ``remove`` and so ``show`` and ``rm``."""
    try:
        if not name.startswith("hf:"):
            return entry_for(name).name
        repo, revision, filename = parse_hf(name)
    except ModelNotFoundError:
        return None
    prefix = hf_prefix(repo, revision)
    if filename is None:
        filename = pick_gguf(m.name[len(prefix):] for m in list_models() if m.name.startswith(prefix))[0]
    return None if filename is None else prefix + filename


@dataclass(frozen=True)
class CachedProjector:
    """A model's multimodal projector (an mmproj GGUF from the model's repository), beside the model."""

    file: str  # its path in the repository
    path: Path
    source: str
    size: int | None = None  # None until it is downloaded and verified
    sha256: str | None = None

    @property
    def complete(self) -> bool:
        """Whether the verified file is there (it is not while a download is unfinished)."""
        return self.sha256 is not None and self.path.is_file()

    @classmethod
    def of(cls, item: dict) -> CachedProjector | None:
        """The projector an index item records, or None."""
        record = item.get("projector")
        if not isinstance(record, dict):
            return None
        return cls(record["file"], Path(record["path"]), record["source"], record.get("size"), record.get("sha256"))


@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size: int
    sha256: str
    source: str
    pulled_at: str
    projector: CachedProjector | None = None


def _index_path() -> Path:
    return models_dir() / INDEX_FILE


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_index() -> dict[str, dict]:
    try:
        return json.loads(_index_path().read_text())
    except (OSError, ValueError):
        return {}


def _update_index(change: Callable[[dict], None]) -> None:
    with _locked(models_dir() / ".index.lock"):
        index = _read_index()
        change(index)
        tmp = _index_path().with_suffix(".tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, _index_path())


def list_models() -> list[CachedModel]:
    """Models in the cache whose file is still there."""
    result = []
    for name, item in sorted(_read_index().items()):
        path = Path(item["path"])
        if path.is_file():
            result.append(CachedModel(name, path, item["size"], item["sha256"], item["source"], item["pulled_at"],
                                      CachedProjector.of(item)))
    return result


def projector_of(path: Path) -> CachedProjector | None:
    """The projector recorded with the cached model whose file is ``path``, or None."""
    return next((CachedProjector.of(item) for item in _read_index().values() if item.get("path") == str(path)), None)


def remove(name: str) -> Path:
    """Delete a cached model, its projector and their partial downloads; returns the directory removed.
    ``name`` is resolved as ``cached`` resolves it (``cache_name``), or is a name the index holds."""
    index = _read_index()
    key = name if name in index else cache_name(name)
    if key is None or key not in index:
        cached = ", ".join(sorted(index)) or "none"
        raise ModelNotFoundError(f"{name!r} is not in the cache (cached: {cached}).")
    directory = Path(index[key]["path"]).parent
    shutil.rmtree(directory, ignore_errors=True)
    _update_index(lambda idx: idx.pop(key, None))
    return directory


def _record(entry: RegistryEntry, final: Path, digest: str, origin: str) -> None:
    item = {"path": str(final), "size": final.stat().st_size, "sha256": digest, "source": origin,
            "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(final.stat().st_mtime))}
    _update_index(lambda index: index.__setitem__(entry.name, item))


def _record_projector(name: str, projector: CachedProjector | None) -> None:
    """Record ``name``'s projector (None: its repository has none) beside the model's own record."""
    record = None if projector is None else {
        "file": projector.file, "path": str(projector.path), "source": projector.source, "size": projector.size,
        "sha256": projector.sha256}

    def change(index: dict) -> None:
        if name in index:  # (removed meanwhile: nothing to record)
            index[name]["projector"] = record

    _update_index(change)
