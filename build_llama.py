#!/usr/bin/env python3
"""Build the pinned upstream llama.cpp into shared libraries (libllama + ggml, and libmtmd for
images and audio in).

Run it as a script (``python build_llama.py --help``) or import it: the packaging
hook in ``setup.py`` calls :func:`build`. The result is cached per user, keyed by
the pinned commit and the build options, so a second build with the same options
is instant. An entry only becomes visible once it is complete (it is assembled in
a temporary directory and renamed into place).

The pin and where the source comes from (and how it is verified) are in
``llama_source.py``.

This module uses only the standard library (plus ``rich`` and ``platformdirs``
when they are installed), so it runs before mullama itself is installed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# --- the pin, the source, and status output live in llama_source.py -------------
sys.path.append(str(Path(__file__).resolve().parent))  # after site-packages: an installed mullama wins
from llama_source import (  # the one place of the pin
    CONSOLE,
    LLAMA_CPP_COMMIT,
    BuildError,
    ensure_source,
    say,
    sha256_file,
)
from mullama._paths import llama_cache_dir

#: Bumped whenever cmake_definitions() changes, so cached builds of an older recipe are not reused.
BUILD_RECIPE = 4

#: ggml's AMX kernels are left out of native builds. On VMs that advertise AMX (Firecracker guests
#: among them) upstream's own llama-bench dies by SIGILL (ILL_ILLOPN) at the first tile load of a prompt
#: decode, in tinygemm_kernel_amx, whether it runs one thread or two; a CPU without AMX never used them.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"

#: Upstream's RPC server (ggml's RPC backend is always built: ``Model.load(rpc_servers=...)``).
RPC_SERVER = "ggml-rpc-server"
#: ``--cuda`` / ``--vulkan``: shortcuts for ggml's cmake options of those backends.
BACKEND_SHORTCUTS = {"cuda": "-DGGML_CUDA=ON", "vulkan": "-DGGML_VULKAN=ON"}

#: Shared libraries that mullama itself loads (the wheel bundles exactly these).
CORE_LIBRARY_PREFIXES = ("libllama.so", "libggml", "libmtmd.so")
LIBLLAMA = "libllama.so.0"
#: libmtmd (the pinned tree's tools/mtmd: images and audio in) and the cmake target that builds it.
#: Always built with libllama; the build key does not change for it (the cmake definitions are the
#: same), so a cached entry made before it was built gets it added by an incremental build.
LIBMTMD = "libmtmd.so.0"
MTMD_TARGET = "mtmd"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class BuildOptions:
    """Options that change the built libraries (and therefore the cache key)."""

    portable: bool = False
    cmake_args: tuple[str, ...] = ()
    build_type: str = "Release"

    def key(self) -> str:
        """The cache entry's name. A native build is for this CPU's features: a cache shared by
        machines with different CPUs (a home directory on a network share) never hands one of them
        a build with instructions it lacks."""
        fields = {"commit": LLAMA_CPP_COMMIT, "recipe": BUILD_RECIPE, "portable": self.portable,
                  "cmake_args": list(self.cmake_args), "build_type": self.build_type}
        if not self.portable:
            fields["cpu"] = hashlib.sha256(" ".join(cpu_features()).encode()).hexdigest()[:16]
        blob = json.dumps(fields, sort_keys=True)
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
            # The RPC backend (a small library, no dependencies): layers can be offloaded to
            # upstream's rpc-server on other machines (Model.load(rpc_servers=...), --rpc).
            "-DGGML_RPC=ON",
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
        if not self.portable and "amx_tile" in cpu_features():
            defs += [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]
        return defs + list(self.cmake_args)


def cpu_features() -> tuple[str, ...]:
    """This CPU's feature flags, sorted (the first ``flags`` or ``Features`` line of /proc/cpuinfo;
    none where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return tuple(sorted(set(value.split())))
    return ()


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

    @property
    def libmtmd(self) -> Path:
        return self.lib_dir / LIBMTMD

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    def core_libraries(self) -> list[Path]:
        """libllama and the ggml libraries it needs (what the wheel bundles)."""
        return sorted(p for p in self.lib_dir.iterdir() if p.name.startswith(CORE_LIBRARY_PREFIXES))


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
    if missing or not cmake:
        raise BuildError("cannot build llama.cpp, missing: " + "; ".join(missing))
    return {"cmake": cmake, "ninja": shutil.which("ninja") or ""}


_PROGRESS = re.compile(r"^\[\s*(\d+)/(\d+)\]|^\[\s*(\d+)%\]")


def _run_logged(command: list[str], log: Path, label: str) -> None:
    """Run a command, appending its output to ``log``, showing progress; raise on failure."""
    with open(log, "a", buffering=1) as log_file:  # line-buffered: the log is live
        log_file.write(f"\n$ {' '.join(command)}\n")
        log_file.flush()
        # Its own process group, so that an interruption stops the whole compiler tree.
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        status = CONSOLE.status(label) if CONSOLE is not None and CONSOLE.is_terminal else None
        if status:
            status.start()
        last_report = 0.0
        try:
            for line in proc.stdout or ():  # (a pipe: never None)
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
    """Build (or reuse) libllama + ggml + libmtmd for ``options``, plus any upstream ``tools``."""
    tools = [t for t in tools if t]
    existing = cached_build(options)
    if existing is not None and existing.libmtmd.is_file() and all(existing.tool(t).is_file() for t in tools):
        return existing
    with _build_lock(llama_cache_dir(), options.key()):
        existing = cached_build(options)  # another builder may have made it while this one waited
        if existing is not None and existing.libmtmd.is_file() and all(existing.tool(t).is_file() for t in tools):
            say(f"built meanwhile by another process: {existing.lib_dir}")
            return existing
        return _build_entry(options, existing, tools, source, jobs)


@contextlib.contextmanager
def _build_lock(cache: Path, key: str) -> Iterator[None]:
    """One builder per cache entry at a time. A second one (another ``pip install``, a parallel CI job)
    waits for the first and then finds the entry complete, instead of compiling into the same build
    directory. The lock is ``flock``'s: it goes with its process, so a killed build leaves none behind."""
    import fcntl

    path = cache / "build" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another build of this llama.cpp to finish (lock: {path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _build_entry(options: BuildOptions, existing: BuildResult | None, tools: list[str],
                 source: str | os.PathLike | None, jobs: int | None) -> BuildResult:
    """Compile into the build directory and publish the cache entry (the caller holds the lock)."""
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

    targets = ["llama", MTMD_TARGET, *tools]
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
        # Adding tools (or libmtmd) to a complete entry: each file lands atomically, the manifest last.
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
    shortcuts = [flag for name, flag in BACKEND_SHORTCUTS.items() if getattr(args, name)]
    return BuildOptions(portable=args.portable, cmake_args=(*shortcuts, *(args.cmake_arg or ())))


def tools_from_args(args: argparse.Namespace) -> list[str]:
    tools = [tool for tool in args.tools.split(",") if tool]
    if args.rpc and RPC_SERVER not in tools:
        tools.append(RPC_SERVER)
    return tools


def backend_name(options: BuildOptions) -> str:
    """The accelerator a build's options enable ("cpu" when none): wheels are named for it."""
    for name, flag in BACKEND_SHORTCUTS.items():
        if flag in options.cmake_args:
            return name
    return "cpu"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Build llama.cpp {LLAMA_CPP_COMMIT[:8]} into shared libraries for mullama (cached per user).",
        epilog="examples:\n"
               "  python build_llama.py\n"
               "  python build_llama.py --tools llama-server,llama-bench\n"
               "  python build_llama.py --portable --print-path\n"
               "  python build_llama.py --rpc          # also upstream's ggml-rpc-server\n"
               "  python build_llama.py --cuda         # the same as --cmake-arg=-DGGML_CUDA=ON",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", help="a llama.cpp source directory or archive (default: download)")
    parser.add_argument("--jobs", "-j", type=int, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--portable", action="store_true",
                        help="no -march=native, for redistributable wheels")
    parser.add_argument("--tools", default="", help="upstream tools to build too, e.g. llama-server,llama-bench")
    parser.add_argument("--rpc", action="store_true",
                        help=f"also build upstream's {RPC_SERVER} (for offloading layers to other machines)")
    parser.add_argument("--cuda", action="store_true", help="NVIDIA GPUs (-DGGML_CUDA=ON; needs the CUDA toolkit)")
    parser.add_argument("--vulkan", action="store_true", help="Vulkan GPUs (-DGGML_VULKAN=ON; needs the Vulkan SDK)")
    parser.add_argument("--cmake-arg", action="append", metavar="ARG", help="extra cmake argument (repeatable)")
    parser.add_argument("--print-path", action="store_true", help="print the directory of the built libraries")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        result = build(options_from_args(args), tools=tools_from_args(args), source=args.source, jobs=args.jobs)
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
