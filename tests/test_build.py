"""build_llama.py: cached, atomic, clear about what is missing."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

import build_llama
import llama_source

REPO = Path(__file__).resolve().parent.parent
SCRIPT = str(REPO / "build_llama.py")
HANG = 600  # seconds: waits are for events (a line, an exit); this bound only guards against a hang
INTERRUPTED_LINE = "interrupted: nothing was added to the cache"  # build_llama.main on Ctrl-C/SIGINT


def run_build(args: list[str], env_extra: dict, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=600, **kwargs, check=False)


def test_a_second_build_is_a_cache_hit(build):
    manifest = build.root / build_llama.MANIFEST_NAME
    before = manifest.stat().st_mtime_ns
    result = run_build(["--print-path", "--tools", "llama-server"], {})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(build.lib_dir)
    assert manifest.stat().st_mtime_ns == before  # nothing was rebuilt or rewritten
    assert "compiling" not in result.stderr


def test_the_manifest_describes_the_build(build):
    manifest = build.manifest
    assert manifest["commit"] == build_llama.LLAMA_CPP_COMMIT
    assert manifest["llama_h_sha256"] == llama_source.LLAMA_H_SHA256
    assert manifest["options"] == {"portable": False, "cmake_args": [], "build_type": "Release"}
    for name, digest in manifest["libraries"].items():
        assert build_llama.sha256_file(build.lib_dir / name) == digest
    assert {"libllama.so.0", "libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0"} <= set(manifest["libraries"])
    # libmtmd (images and audio in) is always built with libllama, and bundled with it in wheels.
    assert "libmtmd.so.0" in manifest["libraries"]
    assert build.libmtmd in build.core_libraries()


def test_libraries_find_each_other_wherever_copied(build, tmp_path):
    out = subprocess.run(["readelf", "-d", str(build.libllama)], capture_output=True, text=True, check=False).stdout
    assert "$ORIGIN" in out
    assert str(build.root) not in out and "/build/" not in out


def test_missing_toolchain_is_one_clear_error(tmp_path):
    result = run_build([], {"MULLAMA_HOME": str(tmp_path), "PATH": str(tmp_path), "CC": "", "CXX": ""})
    assert result.returncode == 1
    assert "missing: cmake" in result.stderr
    assert "C and C++ compiler" in result.stderr
    assert not list(tmp_path.glob("llama.cpp/*/manifest.json"))


def test_unusable_sources_are_reported_in_one_line_and_the_next_is_tried(tmp_path, build, capsys):
    source = build_llama.ensure_source()
    fake = tmp_path / "llama.cpp"
    (fake / "include").mkdir(parents=True)
    (fake / "ggml" / "include").mkdir(parents=True)
    (fake / "include" / "llama.h").write_text((source / "include" / "llama.h").read_text() + "\n// edited\n")
    (fake / "ggml" / "include" / "ggml.h").write_text("")
    assert llama_source._find_tree(fake) == fake
    try:
        llama_source._source_from_path(fake, tmp_path)
    except build_llama.BuildError as exc:
        assert "not the pinned one" in str(exc)
    else:
        raise AssertionError("an edited llama.h was accepted")
    for bad in (fake, tmp_path / "nowhere"):
        capsys.readouterr()
        assert build_llama.ensure_source(bad) == source  # fell through to the pinned tree downloaded before
        lines = [line for line in capsys.readouterr().err.splitlines() if "source unavailable" in line]
        assert len(lines) == 1 and str(bad) in lines[0]


def test_a_source_archive_is_accepted(tmp_path, build):
    """An archive given with --source is extracted and checked (here: the pinned headers only)."""
    source = build_llama.ensure_source()
    archive = tmp_path / "llama.cpp.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "include", arcname="llama.cpp-x/include")
        tar.add(source / "ggml" / "include", arcname="llama.cpp-x/ggml/include")
    staging = tmp_path / "staging"
    staging.mkdir()
    tree = llama_source._source_from_path(archive, staging)
    assert (tree / "include" / "llama.h").is_file()


def _lines(stream) -> queue.Queue[str | None]:
    """The lines of ``stream`` as they come, read by a thread; None at its end."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_for_line(lines: queue.Queue[str | None], text: str, bound: float) -> str:
    """The lines read until one holding ``text``, that one included. ``bound`` (seconds) only guards
    against a hang: the wait is for the line, however long a busy machine takes to print it."""
    seen: list[str] = []
    deadline = time.monotonic() + bound
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no line with {text!r} after {bound:.0f} s (a hang?); the output so far:\n{''.join(seen)}")
        if line is None:
            pytest.fail(f"the output ended without a line with {text!r}:\n{''.join(seen)}")
        seen.append(line)
        if text in line:
            return "".join(seen)


def test_an_interrupted_build_leaves_no_complete_looking_entry(tmp_path, build, monkeypatch):
    home = tmp_path / "home"
    env = dict(os.environ, MULLAMA_HOME=str(home))
    process = subprocess.Popen([sys.executable, SCRIPT, "--source", str(build_llama.ensure_source()), "-j", "1"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = _lines(process.stderr)
    try:
        # Events, not time: the compiler has started (a line in the build's log), then the build says it was
        # interrupted (its own line, printed once its compiler is stopped). The bounds only guard against hangs.
        deadline = time.monotonic() + HANG
        logs = []
        while not logs and process.poll() is None and time.monotonic() < deadline:
            logs = [p for p in home.glob("llama.cpp/build/*/build.log") if "Building" in p.read_text(errors="replace")]
            time.sleep(0.5)
        assert logs, "the build never started compiling"
        process.send_signal(signal.SIGINT)
        said = _wait_for_line(stderr, INTERRUPTED_LINE, HANG)
        assert process.wait(timeout=HANG) == 130, said
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    monkeypatch.setenv("MULLAMA_HOME", str(home))
    assert build_llama.cached_build() is None
    assert not list(home.glob("llama.cpp/*/manifest.json"))
    # and the compiler it started was stopped with it
    leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True, check=False).stdout.split()
    assert leftovers == []


def test_a_second_builder_waits_for_the_first_and_takes_its_entry(tmp_path, build, monkeypatch):
    """Two builds of one entry at once (two pip installs, parallel CI jobs): the second waits on the
    first's lock instead of compiling into the same build directory, then finds the entry it made."""
    home = tmp_path / "home"
    monkeypatch.setenv("MULLAMA_HOME", str(home))
    key = build_llama.BuildOptions().key()
    with build_llama._build_lock(build_llama.llama_cache_dir(), key):  # the first builder, here
        process = subprocess.Popen([sys.executable, SCRIPT, "--source", str(build_llama.ensure_source())],
                                   env=dict(os.environ, MULLAMA_HOME=str(home)), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        try:
            stderr = _lines(process.stderr)
            _wait_for_line(stderr, "waiting for another build", HANG)
            assert not list(home.glob("llama.cpp/build/*/CMakeCache.txt"))  # it has not configured
            shutil.copytree(build.root, home / "llama.cpp" / key)  # what the first builder publishes
        except BaseException:
            process.kill()
            raise
    _wait_for_line(stderr, "built meanwhile by another process", HANG)
    assert process.wait(timeout=HANG) == 0
    assert not list(home.glob("llama.cpp/build/*/CMakeCache.txt"))  # and it compiled nothing


def test_native_builds_are_keyed_by_the_cpu_and_leave_amx_out(monkeypatch, build):
    """A native build is for one CPU's features (a cache shared by two kinds of machine keeps one build
    for each), and leaves ggml's AMX kernels out: on VMs that advertise AMX they die by SIGILL."""
    options, portable = build_llama.BuildOptions(), build_llama.BuildOptions(portable=True)
    here = (options.key(), portable.key())
    monkeypatch.setattr(build_llama, "cpu_features", lambda: ("avx2", "fma"))
    assert options.key() != here[0] and portable.key() == here[1]
    assert not any("amx" in d for d in options.cmake_definitions())
    monkeypatch.setattr(build_llama, "cpu_features", lambda: ("amx_int8", "amx_tile", "avx512f"))
    assert f"-DCMAKE_CXX_FLAGS={build_llama.NO_AMX_FLAGS}" in options.cmake_definitions()
    assert not any("amx" in d for d in portable.cmake_definitions())
    monkeypatch.undo()
    if "amx_tile" in build_llama.cpu_features():  # this machine's build: configured without AMX
        cache = (build_llama.llama_cache_dir() / "build" / options.key() / "CMakeCache.txt").read_text()
        assert f"CMAKE_CXX_FLAGS:STRING={build_llama.NO_AMX_FLAGS}" in cache


def test_backend_shortcuts_and_rpc_are_cmake_options_and_tools():
    parse = build_llama.make_parser().parse_args
    cuda = build_llama.options_from_args(parse(["--cuda", "--cmake-arg=-DGGML_CUDA_F16=ON"]))
    assert cuda.cmake_args == ("-DGGML_CUDA=ON", "-DGGML_CUDA_F16=ON")
    assert build_llama.backend_name(cuda) == "cuda"
    assert build_llama.backend_name(build_llama.options_from_args(parse(["--vulkan"]))) == "vulkan"
    plain = build_llama.options_from_args(parse(["--rpc"]))
    assert build_llama.backend_name(plain) == "cpu" and plain == build_llama.BuildOptions()  # --rpc: one more tool
    assert build_llama.tools_from_args(parse(["--rpc", "--tools", "llama-server"])) == ["llama-server",
                                                                                          "ggml-rpc-server"]
    assert "-DGGML_RPC=ON" in plain.cmake_definitions()  # every build can offload to RPC servers


def test_the_build_has_the_rpc_backend_and_server(build):
    assert build.tool(build_llama.RPC_SERVER).is_file()
    assert any(path.name.startswith("libggml-rpc") for path in build.core_libraries())


# --- the sdist fallback without pip (pip's isolated build environment has none) -------------------
FETCH_SDIST = """
import sys
from pathlib import Path
sys.path.insert(0, {repo!r})
try:
    import pip  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("this interpreter has pip")
import llama_source
staging = Path(sys.argv[1])
try:
    tree = llama_source._source_from_sdist(staging)
except llama_source.BuildError as exc:
    print("BuildError:", exc)
    raise SystemExit(3)
print(tree)
"""


@pytest.fixture(scope="module")
def python_without_pip(tmp_path_factory) -> Path:
    """An interpreter with no pip, like the one of pip's isolated build environment."""
    venv = tmp_path_factory.mktemp("nopip") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv / "bin" / "python"


def fetch_sdist(python: Path, staging: Path, env_extra: dict) -> subprocess.CompletedProcess:
    """Run llama_source's sdist fallback in ``python`` (a fresh MULLAMA_HOME, so nothing cached is used)."""
    script = staging.parent / "fetch_sdist.py"
    script.write_text(FETCH_SDIST.format(repo=str(REPO)))
    staging.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, MULLAMA_HOME=str(staging.parent / "home"), **env_extra)
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(python), str(script), str(staging)], capture_output=True, text=True, env=env,
                          timeout=900, check=False)


@pytest.mark.slow
def test_the_sdist_is_fetched_from_the_configured_index_without_pip(python_without_pip, tmp_path):
    """The pinned sdist (~50 MB) comes from the index pip is configured with, by an interpreter with no pip."""
    result = fetch_sdist(python_without_pip, tmp_path / "staging", {})
    assert result.returncode == 0, result.stdout + result.stderr
    tree = Path(result.stdout.strip().splitlines()[-1])
    assert build_llama.sha256_file(tree / "include" / "llama.h") == llama_source.LLAMA_H_SHA256
    assert (tree / "ggml" / "include" / "ggml.h").is_file()
    assert not (tmp_path / "staging" / "download").exists()  # the archive is not kept


def test_an_sdist_with_a_wrong_checksum_is_refused_in_one_line(python_without_pip, tmp_path):
    """A local simple index (PIP_INDEX_URL, as pip reads it) serving a different archive: refused, removed."""
    project = tmp_path / "index" / "llama-cpp-python"
    project.mkdir(parents=True)
    name = "llama_cpp_python-0.3.36.tar.gz"
    payload = tmp_path / "payload" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "include"
    payload.mkdir(parents=True)
    (payload / "llama.h").write_text("// not the pinned header\n")
    with tarfile.open(project / name, "w:gz") as tar:
        tar.add(tmp_path / "payload" / "llama_cpp_python-0.3.36", arcname="llama_cpp_python-0.3.36")
    (project / "index.html").write_text(f'<html><body><a href="{name}#sha256=0">{name}</a></body></html>')
    staging = tmp_path / "staging"
    result = fetch_sdist(python_without_pip, staging, {"PIP_INDEX_URL": (tmp_path / "index").as_uri()})
    assert result.returncode == 3, result.stdout + result.stderr
    error = result.stdout.strip()
    assert error.count("\n") == 0
    assert f"{name} has sha256 " in error and f"expected {llama_source.SDIST_SHA256}; refusing to build it." in error
    assert not list(staging.rglob("*.tar.gz"))  # nothing unverified is left behind


def test_pip_settings_follow_pips_configuration_and_environment(tmp_path, monkeypatch):
    """index-url and extra-index-url from a pip config file, the environment winning; PyPI by default."""
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = https://mirror.example/simple/\n"
                      "extra-index-url = file:///a/simple\n    file:///b/simple\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    assert llama_source.package_indexes() == ["https://mirror.example/simple", "file:///a/simple",
                                              "file:///b/simple"]
    monkeypatch.setenv("PIP_INDEX_URL", "https://other.example/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "file:///c/simple")
    assert llama_source.package_indexes() == ["https://other.example/simple", "file:///c/simple"]
