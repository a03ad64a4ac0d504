"""The pinned llama.cpp source: which commit, where to get it, and how it is verified.

Tried in order: ``--source DIR|ARCHIVE`` (or ``MULLAMA_LLAMA_CPP_SOURCE``), a tree
downloaded before, the upstream GitHub archive of the pinned commit, and the PyPI sdist
of llama-cpp-python that vendors exactly that tree (its sha256 is checked before use),
fetched from the index pip is configured with (``index-url``, then each ``extra-index-url``)
over HTTP with the standard library: pip's isolated build environment has no pip to call.
Each unusable source is reported in one line and the next is tried. Every source must
carry the pinned ``llama.h`` (checked by sha256), because the generated cffi bindings
describe exactly that header.

Standard library only (plus ``rich`` when installed): ``build_llama.py`` runs before
mullama is installed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import ssl
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent))  # after site-packages: an installed mullama wins
from mullama._paths import llama_cache_dir

# --- the pin: one place -------------------------------------------------------
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
LLAMA_H_SHA256 = "d5cf9203bea63b575e76cba4881f29cfd1b611451578b01582b75b72ecbb04bc"
GITHUB_ARCHIVE_URL = f"https://github.com/ggml-org/llama.cpp/archive/{LLAMA_CPP_COMMIT}.tar.gz"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_SUBDIR = "vendor/llama.cpp"


class BuildError(Exception):
    """The build cannot go on; the message says what to do."""


# --- output -------------------------------------------------------------------
def _console():
    try:
        from rich.console import Console
    except ImportError:  # rich is optional here: the build runs before install
        return None
    return Console(stderr=True, highlight=False, soft_wrap=True)


CONSOLE = _console()


def say(message: str) -> None:
    """Print one status line to stderr (styled when rich is available)."""
    if CONSOLE is not None:
        from rich.markup import escape

        CONSOLE.print(f"[bold cyan]mullama-build[/] {escape(message)}")
    else:
        print(f"mullama-build {message}", file=sys.stderr, flush=True)


# --- source -------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _find_tree(top: Path) -> Path | None:
    """The directory under ``top`` (at most 3 levels deep) that holds a llama.cpp tree."""
    candidates = [top, *top.glob("*"), *top.glob("*/*"), *top.glob("*/*/*")]
    for candidate in candidates:
        if (candidate / "include" / "llama.h").is_file() and (candidate / "ggml" / "include" / "ggml.h").is_file():
            return candidate
    return None


def _check_header(tree: Path, origin: str) -> None:
    actual = sha256_file(tree / "include" / "llama.h")
    if actual != LLAMA_H_SHA256:
        raise BuildError(
            f"{origin}: include/llama.h is not the pinned one (sha256 {actual[:16]}..., expected "
            f"{LLAMA_H_SHA256[:16]}...). Provide llama.cpp at commit {LLAMA_CPP_COMMIT}."
        )


def _extract(archive: Path, into: Path, member_filter: str | None = None) -> None:
    """Extract a .tar.* or .zip archive safely (no absolute paths, no escaping links)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if member_filter is None or member_filter in n]
            zf.extractall(into, members=names)
        return
    with tarfile.open(archive) as tf:
        members = [m for m in tf.getmembers() if member_filter is None or member_filter in m.name]
        tf.extractall(into, members=members, filter="data")


def _source_from_path(path: Path, staging: Path) -> Path:
    path = path.expanduser().resolve()
    if path.is_dir():
        tree = _find_tree(path)
        if tree is None:
            raise BuildError(f"{path}: no llama.cpp tree here (expected include/llama.h and ggml/).")
        _check_header(tree, str(path))
        return tree
    if not path.is_file():
        raise BuildError(f"{path}: no such file or directory.")
    _extract(path, staging)
    tree = _find_tree(staging)
    if tree is None:
        raise BuildError(f"{path}: the archive holds no llama.cpp tree.")
    _check_header(tree, str(path))
    return tree


def _source_from_github(staging: Path) -> Path:
    archive = staging / "llama.cpp.tar.gz"
    with urllib.request.urlopen(GITHUB_ARCHIVE_URL, timeout=30) as response, open(archive, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)
    _extract(archive, staging)
    archive.unlink()
    tree = _find_tree(staging)
    if tree is None:
        raise BuildError("the GitHub archive holds no llama.cpp tree")
    _check_header(tree, "GitHub archive")
    return tree


#: Where pip keeps its configuration, lowest priority first (site-wide, then per user, then the venv's).
_PIP_CONFIG_FILES = (
    Path("/etc/xdg/pip/pip.conf"),
    Path("/etc/pip.conf"),
    Path.home() / ".pip" / "pip.conf",
    Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "pip" / "pip.conf",
    Path(sys.prefix) / "pip.conf",
)
PYPI_SIMPLE = "https://pypi.org/simple"


def pip_settings() -> dict[str, str]:
    """pip's ``index-url``, ``extra-index-url`` and ``cert`` as pip would see them, without pip.

    Read from pip's configuration files (``[global]``, then ``[download]``; ``PIP_CONFIG_FILE``
    last) and the ``PIP_INDEX_URL`` / ``PIP_EXTRA_INDEX_URL`` / ``PIP_CERT`` variables, which win.
    """
    import configparser

    files = list(_PIP_CONFIG_FILES)
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    settings: dict[str, str] = {}
    for path in files:
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except (OSError, configparser.Error):
            continue  # pip would complain; the index is all we need, so carry on with the defaults
        for section in ("global", "download"):
            if parser.has_section(section):
                for key in ("index-url", "extra-index-url", "cert"):
                    if parser.has_option(section, key):
                        settings[key] = parser.get(section, key)
    for key in ("index-url", "extra-index-url", "cert"):
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            settings[key] = value
    return settings


def package_indexes() -> list[str]:
    """The simple indexes pip would search, in order: its index-url (PyPI by default), then each extra one."""
    settings = pip_settings()
    indexes = [settings.get("index-url", "").strip() or PYPI_SIMPLE, *settings.get("extra-index-url", "").split()]
    return list(dict.fromkeys(url.rstrip("/") for url in indexes if url))


class _Links(HTMLParser):
    """The ``href`` of every ``<a>`` on a simple-index page (PEP 503)."""

    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _local_path(url: str) -> Path:
    """The path a ``file:`` URL names."""
    return Path(urllib.request.url2pathname(urllib.parse.urlsplit(url).path))


def _open(url: str, cafile: str | None, timeout: float = 60):
    """Open ``url`` (http(s) or file; a ``file:`` directory is read through its ``index.html``)."""
    if url.startswith("file:"):
        path = _local_path(url)
        if path.is_dir():
            url = (path / "index.html").as_uri()
        return urllib.request.urlopen(url, timeout=timeout)
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    request = urllib.request.Request(url, headers={"Accept": "text/html", "User-Agent": "mullama-build"})
    return urllib.request.urlopen(request, timeout=timeout, context=context)


def _sdist_url(index: str, cafile: str | None) -> str | None:
    """The URL of the pinned sdist on one simple index, or None when that index does not list it."""
    project, version = SDIST_REQUIREMENT.split("==")
    page_url = f"{index}/{re.sub(r'[-_.]+', '-', project).lower()}/"
    if page_url.startswith("file:") and not _local_path(page_url).exists():
        return None  # a local index without the project
    try:
        with _open(page_url, cafile) as response:
            page = response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    links = _Links()
    links.feed(page)
    wanted = {f"{name}-{version}.tar.gz" for name in (project, project.replace("-", "_"))}
    for href in links.hrefs:
        url = urllib.parse.urljoin(page_url, href)
        if urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]) in wanted:
            return url.split("#", 1)[0]
    return None


def download_sdist(into: Path) -> Path:
    """Download the pinned sdist into ``into`` from the first index pip would use that lists it.

    Standard library only: inside pip's isolated build environment there is no pip to call.
    The archive's sha256 is checked here; a wrong one is refused (and the file removed).
    """
    settings = pip_settings()
    cafile = settings.get("cert") or None
    unreachable: list[str] = []
    for index in package_indexes():
        try:
            url = _sdist_url(index, cafile)
        except (OSError, ValueError) as exc:  # an index that cannot be reached: try the next one
            unreachable.append(f"{index} ({type(exc).__name__}: {exc})")
            continue
        if url is None:
            continue
        into.mkdir(parents=True, exist_ok=True)
        archive = into / urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        with _open(url, cafile, timeout=120) as response, open(archive, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        actual = sha256_file(archive)
        if actual != SDIST_SHA256:
            archive.unlink()
            raise BuildError(f"{archive.name} has sha256 {actual}, expected {SDIST_SHA256}; refusing to build it.")
        return archive
    where = "; ".join(unreachable) if unreachable else ", ".join(package_indexes())
    raise BuildError(f"{SDIST_REQUIREMENT} not found on the package index ({where})")


def _source_from_sdist(staging: Path) -> Path:
    download_dir = staging / "download"
    archive = download_sdist(download_dir)
    _extract(archive, staging / "sdist", member_filter=f"/{SDIST_SUBDIR}/")
    shutil.rmtree(download_dir)
    tree = _find_tree(staging / "sdist")
    if tree is None:
        raise BuildError(f"{archive.name} holds no {SDIST_SUBDIR}")
    _check_header(tree, archive.name)
    return tree


def _cached_source(_staging: Path) -> Path:
    cached = llama_cache_dir() / "src" / LLAMA_CPP_COMMIT
    if not (cached / "include" / "llama.h").is_file():
        raise BuildError("not downloaded yet")
    _check_header(cached, str(cached))
    return cached


def ensure_source(source: str | os.PathLike | None = None) -> Path:
    """Return a directory holding the pinned llama.cpp source tree.

    Tried in order: ``source`` (or ``MULLAMA_LLAMA_CPP_SOURCE``), a tree downloaded before,
    the GitHub archive, the PyPI sdist. Each failure is reported in one line and the next
    tried. Downloads are cached under ``<cache>/llama.cpp/src/<commit>``.
    """
    source = source or os.environ.get("MULLAMA_LLAMA_CPP_SOURCE")
    cached = llama_cache_dir() / "src" / LLAMA_CPP_COMMIT
    cached.parent.mkdir(parents=True, exist_ok=True)
    attempts: list[tuple[str, Callable[[Path], Path], bool]] = []  # (label, fetch(staging) -> tree, keep a copy)
    if source:
        attempts.append((f"--source {source}", lambda staging: _source_from_path(Path(source), staging), False))
    attempts.append(("cached download", _cached_source, False))
    attempts.append(("GitHub archive", _source_from_github, True))
    attempts.append((f"PyPI sdist {SDIST_REQUIREMENT}", _source_from_sdist, True))
    failures = []
    for label, fetch, store in attempts:
        staging = Path(tempfile.mkdtemp(prefix="src-", dir=cached.parent))
        try:
            if store:
                say(f"fetching llama.cpp source: {label}")
            tree = fetch(staging)
            if not store and staging not in tree.parents:
                return tree  # a directory used in place
            if tree != staging / "tree":
                os.replace(tree, staging / "tree")
            try:
                os.rename(staging / "tree", cached)
            except OSError:  # another process won the race: use its copy
                if not (cached / "include" / "llama.h").is_file():
                    raise
            return cached
        except BuildError as exc:
            failures.append(f"{label}: {exc}")
        except Exception as exc:  # noqa: BLE001 (network, disk, archive errors: try the next source)
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if label != "cached download":
            say(f"source unavailable: {failures[-1]}")
    raise BuildError(
        "could not get the llama.cpp source:\n  " + "\n  ".join(failures)
        + f"\nDownload llama.cpp at commit {LLAMA_CPP_COMMIT} (or the sdist {SDIST_REQUIREMENT}) and pass it "
        "with --source PATH or MULLAMA_LLAMA_CPP_SOURCE=PATH."
    )
