"""A --portable wheel installs and generates in a fresh venv on a machine path with no compiler."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_portable_wheel_in_a_fresh_venv_without_a_compiler(tmp_path, model_path):
    wheel_dir = tmp_path / "wheels"
    env = dict(os.environ, MULLAMA_BUILD_OPTIONS="--portable")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(REPO)],
                   check=True, env=env, timeout=1800)
    (wheel,) = wheel_dir.glob("mullama-*.whl")
    assert wheel.name.endswith("-py3-none-linux_x86_64.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mullama/lib/libllama.so.0" in names and "mullama/lib/manifest.json" in names
    assert "mullama/_bindings/_llama_ffi.py" in names
    assert not any(name.startswith("bindings/") for name in names)
    manifest = zipfile.ZipFile(wheel).read("mullama/lib/manifest.json").decode()
    assert '"portable": true' in manifest

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)]
    subprocess.run(pip, check=True, timeout=600)

    # Only the venv on PATH: no gcc, cc, cmake; a fresh, empty cache; run from an unrelated directory.
    bare_env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path), "MULLAMA_HOME": str(tmp_path / "cache"),
                "LANG": "C.UTF-8"}
    code = (
        "import shutil, mullama\n"
        "assert not any(shutil.which(c) for c in ('gcc', 'cc', 'c++', 'cmake')), 'a compiler is on PATH'\n"
        "import sys\n"
        "m = mullama.Model.load(sys.argv[1]); c = mullama.Context(m, n_ctx=512)\n"
        "r = c.generate('The capital of France is', max_tokens=8)\n"
        "info = mullama.system_info()\n"
        "print(info['library_path']); print(info['build']['portable']); print(len(r.token_ids))\n"
    )
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code, str(model_path)], env=bare_env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    library_path, portable, n_tokens = result.stdout.split()
    assert library_path.startswith(str(venv)) and library_path.endswith("mullama/lib/libllama.so.0")
    assert portable == "True"
    assert n_tokens == "8"
    shutil.rmtree(venv)
