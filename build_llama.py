#!/usr/bin/env python3
"""Build the pinned upstream llama.cpp into shared libraries (libllama + ggml).

Run it as a script (``python build_llama.py --help``) or import it: the packaging
hook in ``setup.py`` calls :func:`build`. The result is cached per user, keyed by
the pinned commit and the build options, so a second build with the same options
is instant. An entry only becomes visible once it is complete (it is assembled in
a temporary directory and renamed into place).

Where the source comes from, in this order:

1. ``--source DIR|ARCHIVE`` or the ``MULLAMA_LLAMA_CPP_SOURCE`` environment variable;
2. the upstream GitHub archive of the pinned commit;
3. the PyPI sdist of llama-cpp-python that vendors exactly that tree (its sha256 is
   checked before use).

Every source must carry the pinned ``llama.h`` (checked by sha256), because the
generated cffi bindings describe exactly that header.

This module uses only the standard library (plus ``rich`` and ``platformdirs``
when they are installed), so it runs before mullama itself is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

# --- the pin: one place -------------------------------------------------------
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
LLAMA_H_SHA256 = "d5cf9203bea63b575e76cba4881f29cfd1b611451578b01582b75b72ecbb04bc"
GITHUB_ARCHIVE_URL = f"https://github.com/ggml-org/llama.cpp/archive/{LLAMA_CPP_COMMIT}.tar.gz"
SDIST_REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_SUBDIR = "vendor/llama.cpp"

#: Bumped whenever cmake_definitions() changes, so cached builds of an older recipe are not reused.
BUILD_RECIPE = 2

#: Shared libraries that mullama itself loads (the wheel bundles exactly these).
CORE_LIBRARY_PREFIXES = ("libllama.so", "libggml")
LIBLLAMA = "libllama.so.0"
MANIFEST_NAME = "manifest.json"


class BuildError(Exception):
    """The build cannot go on; the message says what to do."""


# --- output -------------------------------------------------------------------
def _console():
    try:
        from rich.console import Console
    except ImportError:  # rich is optional here: the build runs before install
        return None
    return Console(stderr=True, highlight=False, soft_wrap=True)


_CONSOLE = _console()


def say(message: str) -> None:
    """Print one status line to stderr (styled when rich is available)."""
    if _CONSOLE is not None:
        from rich.markup import escape

        _CONSOLE.print(f"[bold cyan]mullama-build[/] {escape(message)}")
    else:
        print(f"mullama-build {message}", file=sys.stderr, flush=True)


# --- where things live (one layout, shared with the library) ------------------
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mullama._paths import llama_cache_dir  # noqa: E402


@dataclass(frozen=True)
class BuildOptions:
    """Options that change the built libraries (and therefore the cache key)."""

    portable: bool = False
    cmake_args: tuple[str, ...] = ()
    build_type: str = "Release"

    def key(self) -> str:
        blob = json.dumps(
            {"commit": LLAMA_CPP_COMMIT, "recipe": BUILD_RECIPE, "portable": self.portable,
             "cmake_args": list(self.cmake_args), "build_type": self.build_type},
            sort_keys=True,
        )
        flavour = "portable" if self.portable else "native"
        return f"{LLAMA_CPP_COMMIT[:12]}-{flavour}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"

    def cmake_definitions(self) -> list[str]:
        native = "OFF" if self.portable else "ON"
        defs = [
            f"-DCMAKE_BUILD_TYPE={self.build_type}",
            "-DBUILD_SHARED_LIBS=ON",
            f"-DGGML_NATIVE={native}",
            # ggml's own thread pool instead of OpenMP: mullama attaches one per context (as upstream's
            # tools do). OpenMP throttles its spinning as soon as two threads of a process decode (async
            # streams, the server, a context per thread), which halved throughput in measurements;
            # the pool was also faster single-threaded on these machines, and leaves no runtime to ship.
            "-DGGML_OPENMP=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=ON",
            "-DLLAMA_BUILD_TOOLS=ON",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_APP=OFF",
            "-DLLAMA_BUILD_UI=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_CURL=OFF",
            f"-DLLAMA_BUILD_COMMIT={LLAMA_CPP_COMMIT[:8]}",
            # Libraries and tools find each other next to themselves, wherever copied.
            "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
            "-DCMAKE_INSTALL_RPATH=$ORIGIN;$ORIGIN/../lib",
        ]
        return defs + list(self.cmake_args)


@dataclass
class BuildResult:
    """A complete cache entry."""

    root: Path
    manifest: dict = field(default_factory=dict)

    @property
    def lib_dir(self) -> Path:
        return self.root / "lib"

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def libllama(self) -> Path:
        return self.lib_dir / LIBLLAMA

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    def core_libraries(self) -> list[Path]:
        """libllama and the ggml libraries it needs (what the wheel bundles)."""
        return sorted(p for p in self.lib_dir.iterdir() if p.name.startswith(CORE_LIBRARY_PREFIXES))


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


def _source_from_sdist(staging: Path) -> Path:
    download_dir = staging / "download"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(download_dir), SDIST_REQUIREMENT]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise BuildError(f"pip download {SDIST_REQUIREMENT} failed: {last}")
    archives = list(download_dir.glob("*.tar.gz"))
    if len(archives) != 1:
        raise BuildError(f"pip download {SDIST_REQUIREMENT} gave no single sdist")
    actual = sha256_file(archives[0])
    if actual != SDIST_SHA256:
        raise BuildError(f"{archives[0].name} has sha256 {actual}, expected {SDIST_SHA256}; refusing to build it.")
    _extract(archives[0], staging / "sdist", member_filter=f"/{SDIST_SUBDIR}/")
    shutil.rmtree(download_dir)
    tree = _find_tree(staging / "sdist")
    if tree is None:
        raise BuildError(f"{archives[0].name} holds no {SDIST_SUBDIR}")
    _check_header(tree, archives[0].name)
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
    attempts: list[tuple[str, object, bool]] = []  # (label, fetch(staging) -> tree, keep a copy in the cache)
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
        except Exception as exc:  # network, disk, archive errors: try the next source
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


# --- build --------------------------------------------------------------------
def _require_toolchain() -> dict[str, str]:
    missing = []
    cmake = shutil.which("cmake")
    if not cmake:
        missing.append("cmake (apt-get install cmake, or pip install cmake)")
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not cc or not cxx:
        missing.append("a C and C++ compiler (apt-get install build-essential)")
    if missing:
        raise BuildError("cannot build llama.cpp, missing: " + "; ".join(missing))
    return {"cmake": cmake, "ninja": shutil.which("ninja") or ""}


_PROGRESS = re.compile(r"^\[\s*(\d+)/(\d+)\]|^\[\s*(\d+)%\]")


def _run_logged(command: list[str], log: Path, label: str) -> None:
    """Run a command, appending its output to ``log``, showing progress; raise on failure."""
    with open(log, "a") as log_file:
        log_file.write(f"\n$ {' '.join(command)}\n")
        log_file.flush()
        # Its own process group, so that an interruption stops the whole compiler tree.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        status = _CONSOLE.status(label) if _CONSOLE is not None and _CONSOLE.is_terminal else None
        if status:
            status.start()
        last_report = 0.0
        try:
            for line in proc.stdout:
                log_file.write(line)
                match = _PROGRESS.match(line)
                if not match:
                    continue
                done, total, percent = match.groups()
                progress = f"{done}/{total}" if done else f"{percent}%"
                if status:
                    status.update(f"{label} [{progress}]")
                elif time.monotonic() - last_report > 30:
                    last_report = time.monotonic()
                    say(f"{label} [{progress}]")
        except BaseException:  # interrupted: stop the compiler too, leave nothing running
            _stop_group(proc)
            raise
        finally:
            rc = proc.wait()
            if status:
                status.stop()
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise BuildError(f"{label} failed (exit {rc}); the last lines of {log}:\n{tail}")


def _stop_group(proc: subprocess.Popen) -> None:
    import signal

    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _copy_outputs(build_bin: Path, lib_dir: Path, bin_dir: Path, tools: list[str]) -> None:
    """Copy each shared library once, under the name other files link to, plus the requested tools.

    A versioned library is kept under its SONAME (``libllama.so.0``: what DT_NEEDED names);
    an unversioned one (``libllama-common-impl.so``) under its own name.
    """
    lib_dir.mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in build_bin.iterdir()}
    for name in sorted(names):
        versioned = re.fullmatch(r"lib.+\.so\.\d+", name)
        unversioned = re.fullmatch(r"lib.+\.so", name) and not any(n.startswith(name + ".") for n in names)
        if not (versioned or unversioned):
            continue
        target = lib_dir / name
        tmp = target.with_name(name + ".tmp")
        shutil.copyfile((build_bin / name).resolve(), tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    for tool in tools:
        built = build_bin / tool
        if not built.is_file():
            raise BuildError(f"the build produced no {tool}")
        tmp = bin_dir / (tool + ".tmp")
        shutil.copyfile(built, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, bin_dir / tool)


def _write_manifest(entry: Path, manifest: dict) -> None:
    tmp = entry / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, entry / MANIFEST_NAME)


def _file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


def cached_build(options: BuildOptions = BuildOptions()) -> BuildResult | None:
    """The complete cache entry for ``options``, or None when there is none."""
    entry = llama_cache_dir() / options.key()
    manifest_path = entry / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("commit") != LLAMA_CPP_COMMIT:
        return None
    return BuildResult(entry, manifest)


def build(
    options: BuildOptions = BuildOptions(),
    *,
    tools: list[str] | tuple[str, ...] = (),
    source: str | os.PathLike | None = None,
    jobs: int | None = None,
) -> BuildResult:
    """Build (or reuse) libllama + ggml for ``options``, plus any upstream ``tools``."""
    tools = [t for t in tools if t]
    existing = cached_build(options)
    if existing is not None and all(existing.tool(t).is_file() for t in tools):
        return existing

    toolchain = _require_toolchain()
    tree = ensure_source(source)
    key = options.key()
    cache = llama_cache_dir()
    build_dir = cache / "build" / key
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / "build.log"
    jobs = jobs or os.cpu_count() or 2
    started = time.monotonic()

    if not (build_dir / "CMakeCache.txt").is_file() or existing is None:
        configure = [toolchain["cmake"], "-S", str(tree), "-B", str(build_dir)]
        if toolchain["ninja"] and not (build_dir / "Makefile").exists():
            configure += ["-G", "Ninja"]
        say(f"configuring llama.cpp {LLAMA_CPP_COMMIT[:8]} ({'portable' if options.portable else 'native'}) "
            f"in {build_dir}")
        _run_logged(configure + options.cmake_definitions(), log, "cmake configure")

    targets = ["llama", *tools]
    say(f"building {', '.join(targets)} with {jobs} jobs (log: {log})")
    _run_logged([toolchain["cmake"], "--build", str(build_dir), "--config", options.build_type,
                 "-j", str(jobs), "--target", *targets], log, "compiling llama.cpp")
    elapsed = time.monotonic() - started

    entry = cache / key
    if existing is None:
        staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache))
        try:
            _copy_outputs(build_dir / "bin", staging / "lib", staging / "bin", tools)
            manifest = {
                "commit": LLAMA_CPP_COMMIT,
                "recipe": BUILD_RECIPE,
                "llama_h_sha256": sha256_file(tree / "include" / "llama.h"),
                "options": {"portable": options.portable, "cmake_args": list(options.cmake_args),
                            "build_type": options.build_type},
                "source": str(tree),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "build_seconds": round(elapsed, 1),
                "libraries": _file_hashes(staging / "lib"),
                "tools": _file_hashes(staging / "bin"),
            }
            _write_manifest(staging, manifest)
            if entry.exists():  # a stale, manifest-less leftover
                shutil.rmtree(entry)
            os.rename(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        # Adding tools to a complete entry: each file lands atomically, the manifest last.
        _copy_outputs(build_dir / "bin", entry / "lib", entry / "bin", tools)
        manifest = dict(existing.manifest)
        manifest["tools"] = _file_hashes(entry / "bin")
        manifest["libraries"] = _file_hashes(entry / "lib")
        _write_manifest(entry, manifest)
    result = cached_build(options)
    assert result is not None
    say(f"done in {elapsed:.0f}s: {result.lib_dir}")
    return result


# --- command line -------------------------------------------------------------
def options_from_args(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(portable=args.portable, cmake_args=tuple(args.cmake_arg or ()))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Build llama.cpp {LLAMA_CPP_COMMIT[:8]} into shared libraries for mullama (cached per user).",
        epilog="examples:\n"
               "  python build_llama.py\n"
               "  python build_llama.py --tools llama-server,llama-bench\n"
               "  python build_llama.py --portable --print-path\n"
               "  python build_llama.py --cmake-arg=-DGGML_CUDA=ON",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", help="a llama.cpp source directory or archive (default: download)")
    parser.add_argument("--jobs", "-j", type=int, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--portable", action="store_true",
                        help="no -march=native, for redistributable wheels")
    parser.add_argument("--tools", default="", help="upstream tools to build too, e.g. llama-server,llama-bench")
    parser.add_argument("--cmake-arg", action="append", metavar="ARG", help="extra cmake argument (repeatable)")
    parser.add_argument("--print-path", action="store_true", help="print the directory of the built libraries")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        result = build(options_from_args(args), tools=args.tools.split(","), source=args.source, jobs=args.jobs)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was added to the cache", file=sys.stderr)
        return 130
    if args.print_path:
        print(result.lib_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
