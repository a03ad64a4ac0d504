"""Find, load and initialise libllama, once, on first use.

Search order:

1. ``MULLAMA_LIBRARY_PATH``: a libllama file, or a directory holding one;
2. the libraries bundled in the installed package (``mullama/lib``);
3. the per-user build cache written by ``build_llama.py``.

``import mullama`` loads nothing; :func:`get` does the work the first time it is
called, under a lock. llama.cpp's log lines go to the ``logging`` logger
``mullama.llama_cpp``, which is quiet unless the application configures logging.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .._exceptions import LibraryError
from .._paths import llama_cache_dir
from ._compute import Compute, available_threads

__all__ = ["Library", "MtmdLibrary", "get", "get_mtmd", "system_info"]

LIBRARY_FILE = "libllama.so.0"  # the SONAME; a directory may also hold plain libllama.so
MTMD_LIBRARY_FILE = "libmtmd.so.0"  # libmtmd (images and audio in), built beside libllama
MANIFEST_FILE = "manifest.json"
PACKAGE_LIB_DIR = Path(__file__).resolve().parent.parent / "lib"

log = logging.getLogger("mullama.llama_cpp")
log.addHandler(logging.NullHandler())


@dataclass(frozen=True)
class Library:
    """The loaded library: ``ffi`` for types and memory, ``lib`` for the C functions,
    ``compute`` for the thread pools and the lock that decodes share."""

    ffi: Any
    lib: Any
    path: Path
    manifest: dict[str, Any]
    compute: Compute


@dataclass(frozen=True)
class MtmdLibrary:
    """libmtmd, loaded from the directory libllama came from: ``ffi`` (which includes the llama
    bindings' types, so their pointers pass as they are) and ``lib`` for its C functions."""

    ffi: Any
    lib: Any
    path: Path


_lock = threading.Lock()
_library: Library | None = None
_mtmd_library: MtmdLibrary | None = None
# ffi.callback objects must outlive every C call that may use them: kept here forever.
_log_callback: Any = None
_mtmd_log_callback: Any = None  # the same forwarder as a callback of the mtmd bindings (their own type)


def _bindings() -> tuple[Any, str, str]:
    try:
        from .._bindings import LLAMA_CPP_COMMIT, LLAMA_H_SHA256
        from .._bindings._llama_ffi import ffi
    except ImportError as exc:  # a source checkout: bindings/ sits beside the package
        import importlib.util
        import sys

        source = Path(__file__).resolve().parents[2] / "bindings" / "__init__.py"
        if not source.is_file():
            raise LibraryError(f"mullama's generated bindings are missing ({exc}); reinstall mullama.") from exc
        spec = importlib.util.spec_from_file_location("mullama._bindings", source,
                                                      submodule_search_locations=[str(source.parent)])
        if spec is None or spec.loader is None:
            raise LibraryError(f"cannot load mullama's generated bindings from {source}; reinstall mullama.") from exc
        module = importlib.util.module_from_spec(spec)
        sys.modules["mullama._bindings"] = module
        spec.loader.exec_module(module)
        from .._bindings import LLAMA_CPP_COMMIT, LLAMA_H_SHA256
        from .._bindings._llama_ffi import ffi
    return ffi, LLAMA_CPP_COMMIT, LLAMA_H_SHA256


def _read_manifest(lib_dir: Path) -> dict[str, Any] | None:
    for candidate in (lib_dir / MANIFEST_FILE, lib_dir.parent / MANIFEST_FILE):
        if candidate.is_file():
            try:
                return cast("dict[str, Any] | None", json.loads(candidate.read_text()))
            except (OSError, ValueError):
                return None
    return None


def _cache_candidates(commit: str) -> list[Path]:
    """Cached builds of ``commit``: default options first, then the newest build recipe, then the newest."""
    root = llama_cache_dir()
    if not root.is_dir():
        return []
    found = []
    for manifest_path in root.glob(f"*/{MANIFEST_FILE}"):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("commit") != commit:
            continue
        options = manifest.get("options", {})
        is_default = not options.get("portable") and not options.get("cmake_args")
        found.append((not is_default, -manifest.get("recipe", 1), -manifest_path.stat().st_mtime,
                      manifest_path.parent / "lib" / LIBRARY_FILE))
    return [path for *_, path in sorted(found)]


def candidate_paths(commit: str) -> list[tuple[str, Path]]:
    """Where libllama may be, in search order, each with where the idea came from."""
    paths = []
    override = os.environ.get("MULLAMA_LIBRARY_PATH")
    if override:
        path = Path(override).expanduser()
        if path.is_dir():
            path = next((path / name for name in (LIBRARY_FILE, "libllama.so") if (path / name).is_file()),
                        path / LIBRARY_FILE)
        paths.append(("MULLAMA_LIBRARY_PATH", path))
        return paths  # an explicit choice is never silently replaced
    paths.append(("bundled", PACKAGE_LIB_DIR / LIBRARY_FILE))
    paths.extend(("build cache", path) for path in _cache_candidates(commit))
    return paths


def _on_log(level: int, text: Any, _user_data: Any, ffi: Any, state: dict[str, Any]) -> None:
    try:
        message = ffi.string(text).decode("utf-8", "replace") if text else ""
        if level == state["continued"]:  # GGML_LOG_LEVEL_CONT: continues the previous line
            state["buffer"] += message
        else:
            if state["buffer"]:
                _emit(state)
            state["level"] = level
            state["buffer"] = message
        if state["buffer"].endswith("\n"):
            _emit(state)
    except Exception:  # noqa: BLE001, S110 (never let a logging problem reach C)
        pass


# ggml's log levels (by their names in the bindings' enum ggml_log_level) as logging's.
_LEVELS = {"NONE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
           "ERROR": logging.ERROR}


_capturing = threading.local()  # .said: the LlamaOutput of the calling thread's capture_output() block
_log_state: dict[str, Any] = {}  # the log forwarder's partial line (see _log_forwarder)
_stderr_lock = threading.Lock()  # one capture of file descriptor 2 at a time


def _emit(state: dict[str, Any]) -> None:
    text = state["buffer"].rstrip("\n")
    state["buffer"] = ""
    level = state["levels"].get(state["level"], logging.INFO)
    said = getattr(_capturing, "said", None)
    if said is not None and level >= logging.WARNING and text:
        said.log.append(text)
    if text and log.isEnabledFor(level):
        log.log(level, "%s", text)


@dataclass
class LlamaOutput:
    """What llama.cpp said while a :func:`capture_output` block ran in the calling thread."""

    log: list[str] = dataclasses.field(default_factory=list)  # its log lines of warning level and above
    stderr: str = ""  # the part of what it printed to stderr that the block claimed


@contextlib.contextmanager
def capture_output(claim: Callable[[str], tuple[str, str]]) -> Iterator[LlamaOutput]:
    """Collect what llama.cpp says during the block, for an error message that gives its reason.

    Its log lines (warning and above, logged by this thread) are collected as they reach the logger.
    Some of its parts print to stderr with ``fprintf`` instead (the grammar parser's errors): file
    descriptor 2 is redirected meanwhile, and ``claim(text)`` splits what arrived into the block's own
    part (kept in ``stderr`` and sent to the ``mullama.llama_cpp`` logger, as the log is) and the rest,
    which other code wrote meanwhile and which goes on to stderr.
    """
    said = LlamaOutput()
    with _stderr_lock:
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no stderr to redirect: collect the log lines only
            saved = None
        sink = tempfile.TemporaryFile() if saved is not None else None
        if sink is not None:
            os.dup2(sink.fileno(), 2)
        _capturing.said = said
        try:
            yield said
        finally:
            if _log_state.get("buffer"):  # a last line without its newline (some errors end so)
                _emit(_log_state)
            _capturing.said = None
            if sink is not None and saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read().decode("utf-8", "surrogateescape")
                sink.close()
                ours, rest = claim(text)
                if rest:
                    os.write(2, rest.encode("utf-8", "surrogateescape"))
                said.stderr = ours.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                if said.stderr:
                    log.error("%s", said.stderr)


def _log_forwarder(ffi: Any) -> Callable[[int, Any, Any], None]:
    """The function llama.cpp calls with each log fragment (it keeps the partial line)."""
    names = {value: name.removeprefix("GGML_LOG_LEVEL_")
             for value, name in ffi.typeof("enum ggml_log_level").elements.items()}
    levels = {value: _LEVELS[name] for value, name in names.items() if name in _LEVELS}
    by_name = {name: value for value, name in names.items()}
    state = _log_state
    state.update(buffer="", level=by_name["INFO"], levels=levels, continued=by_name["CONT"])

    def forward(level: int, text: Any, data: Any) -> None:
        _on_log(level, text, data, ffi, state)

    return forward


def _load() -> Library:
    global _log_callback
    ffi, commit, header_sha = _bindings()
    # An abort inside ggml (GGML_ASSERT) prints a backtrace by forking a debugger from this process,
    # which has threads: the child can deadlock on a lock another thread held at the fork, and the
    # parent waits for it forever (seen: a NaN-epsilon file, on a busy machine). An abort must end the
    # process, so that a supervisor restarts it: no backtrace, unless MULLAMA_GGML_BACKTRACE asks for one.
    if not os.environ.get("MULLAMA_GGML_BACKTRACE"):
        os.environ.setdefault("GGML_NO_BACKTRACE", "1")
    errors = []
    for origin, path in candidate_paths(commit):
        if not path.is_file():
            errors.append(f"{origin}: {path} does not exist")
            continue
        manifest = _read_manifest(path.parent) or {}
        if manifest and (manifest.get("commit") != commit
                         or manifest.get("llama_h_sha256", header_sha) != header_sha):
            raise LibraryError(
                f"{path} was built from llama.cpp {manifest.get('commit', '?')[:12]}, but these bindings "
                f"describe {commit[:12]}; rebuild it with `python build_llama.py` or point "
                "MULLAMA_LIBRARY_PATH at a matching build."
            )
        try:
            lib = ffi.dlopen(str(path))
        except OSError as exc:
            errors.append(f"{origin}: {path}: {exc}")
            continue
        _log_callback = ffi.callback("ggml_log_callback", _log_forwarder(ffi))
        lib.llama_log_set(_log_callback, ffi.NULL)
        lib.llama_backend_init()
        compute = Compute(ffi, lib, available_threads())
        atexit.register(_at_exit, ffi, lib, compute)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=functools.partial(_after_fork_in_child, compute))
        return Library(ffi, lib, path, manifest, compute)
    if os.environ.get("MULLAMA_HOME") and not _cache_candidates(commit):
        errors.append(f"build cache: none in {llama_cache_dir()} (MULLAMA_HOME moves the build cache with the "
                      "models: build again with it set, or unset it)")
    raise LibraryError(
        "cannot find libllama:\n  " + "\n  ".join(errors)
        + "\nBuild it with `python build_llama.py` (from a mullama source checkout), install a mullama "
        "wheel that bundles it, or set MULLAMA_LIBRARY_PATH to a libllama.so built from llama.cpp "
        f"{commit[:12]}."
    )


def _after_fork_in_child(compute: Compute) -> None:
    """In a child made by fork(): the parent's compute threads do not exist here, so contexts and
    engines inherited from it can never decode again (their thread pools would wait forever).
    They become closed (ClosedError says why); models stay usable, and new contexts get new pools."""
    from ._owned import invalidate_after_fork

    invalidate_after_fork()
    compute.abandon_after_fork()


def _at_exit(ffi: Any, lib: Any, compute: Compute) -> None:
    """Free what is still open while the log callback exists, then detach the callback.

    Engines are stopped and their threads joined first (close_all). Objects another thread is still
    using are left alone (never freed), and so are the thread pools then; that thread's decode in
    progress is waited for, and it never decodes again (Compute.hold_for_exit)."""
    from ._owned import close_all

    left_open = close_all()
    if left_open:
        compute.hold_for_exit()
    else:
        compute.close()
    lib.llama_log_set(ffi.NULL, ffi.NULL)


def get() -> Library:
    """The loaded library (loaded on the first call, thread-safely)."""
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                _library = _load()
    return _library


def _load_mtmd(library: Library) -> MtmdLibrary:
    from .._bindings._mtmd_ffi import ffi  # importable once _bindings() has run (get() ran it)

    directory = library.path.parent
    path = next((directory / name for name in (MTMD_LIBRARY_FILE, "libmtmd.so") if (directory / name).is_file()),
                directory / MTMD_LIBRARY_FILE)
    try:
        lib = ffi.dlopen(str(path))
    except OSError as exc:
        raise LibraryError(
            f"cannot load libmtmd (images and audio) beside {library.path}: {exc}. Rebuild with "
            "`python build_llama.py` (it builds libmtmd with libllama), or point MULLAMA_LIBRARY_PATH at a "
            "build that has it."
        ) from exc
    # mtmd and its CLIP encoder log through their own logger: send it where llama.cpp's log goes.
    # cffi gives function-pointer types one identity per ffi, so the callback is made with this ffi.
    global _mtmd_log_callback
    _mtmd_log_callback = ffi.callback("ggml_log_callback", _log_forwarder(library.ffi))
    lib.mtmd_helper_log_set(_mtmd_log_callback, ffi.NULL)
    # Detached at exit (before libllama's exit hook, registered earlier, frees what is left open).
    atexit.register(lib.mtmd_helper_log_set, ffi.NULL, ffi.NULL)
    return MtmdLibrary(ffi, lib, path)


def get_mtmd() -> MtmdLibrary:
    """libmtmd (loaded on the first call, after libllama, thread-safely; opened once)."""
    global _mtmd_library
    if _mtmd_library is None:
        library = get()
        with _lock:
            if _mtmd_library is None:
                _mtmd_library = _load_mtmd(library)
    return _mtmd_library


def system_info() -> dict[str, Any]:
    """What mullama runs on: library path, llama.cpp commit, llama.cpp's own system info."""
    library = get()
    from .._bindings import LLAMA_CPP_COMMIT
    from ._devices import list_devices

    return {
        "library_path": str(library.path),
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "build": library.manifest.get("options", {}),
        "built_at": library.manifest.get("built_at"),
        "system_info": library.ffi.string(library.lib.llama_print_system_info()).decode("utf-8", "replace").strip(),
        "cache_dir": str(llama_cache_dir().parent),
        "devices": [dataclasses.asdict(device) for device in list_devices(library)],
    }
