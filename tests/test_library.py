"""Finding and loading libllama: light import, search order, clear errors, logging."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import mullama
from mullama.native import _library


def run_python(code: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, env=env, timeout=120, check=False)


def test_import_loads_no_native_code():
    code = ("import time; t = time.perf_counter(); import mullama; elapsed = time.perf_counter() - t\n"
            "maps = open('/proc/self/maps').read()\n"
            "import sys\n"
            "print('libllama' in maps, 'cffi' in sys.modules, round(elapsed * 1000))\n")
    result = run_python(code)
    loaded, cffi_imported, _ms = result.stdout.split()
    assert (loaded, cffi_imported) == ("False", "False"), result.stderr


def test_system_info(model):
    info = mullama.system_info()
    assert info["llama_cpp_commit"] == "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    assert os.path.isfile(info["library_path"])
    assert "CPU" in info["system_info"]


def test_library_path_override(tmp_path):
    library = _library.get()
    for path in library.path.parent.glob("lib*.so*"):
        shutil.copy2(path, tmp_path / path.name)
    result = run_python("import mullama; print(mullama.system_info()['library_path'])",
                        {"MULLAMA_LIBRARY_PATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "libllama.so.0")


def test_override_to_nothing_is_a_clear_error(tmp_path):
    code = ("import mullama\n"
            "try:\n    mullama.system_info()\n"
            "except mullama.LibraryError as e:\n    print(e.code); print(e)\n")
    result = run_python(code, {"MULLAMA_LIBRARY_PATH": str(tmp_path / "nope.so")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("LIBRARY_ERROR")
    assert "nope.so" in result.stdout and "build_llama.py" in result.stdout


def test_a_library_from_another_commit_is_refused(tmp_path):
    library = _library.get()
    for path in library.path.parent.glob("lib*.so*"):
        shutil.copy2(path, tmp_path / path.name)
    (tmp_path / "manifest.json").write_text(json.dumps({"commit": "f" * 40}))
    code = ("import mullama\n"
            "try:\n    mullama.system_info()\n"
            "except mullama.LibraryError as e:\n    print(e)\n")
    result = run_python(code, {"MULLAMA_LIBRARY_PATH": str(tmp_path)})
    assert "ffffffffffff" in result.stdout and "0c1e57098bba" in result.stdout, result.stderr


def test_llama_cpp_logs_reach_python_logging(model_path, caplog):
    with caplog.at_level(logging.INFO, logger="mullama.llama_cpp"):
        with mullama.Model.load(model_path) as model:
            with mullama.Context(model, n_ctx=256):
                pass
    messages = [r.getMessage() for r in caplog.records if r.name == "mullama.llama_cpp"]
    assert any("n_ctx" in m for m in messages)
    assert all(not m.endswith("\n") for m in messages)
