"""A Hugging Face repository's multimodal projector, pulled with its model (as llama-server's ``-hf`` does).

A local Hugging Face mirror on 127.0.0.1 (tests/hf_server.py) serves the real SmolLM2 GGUF beside
projectors written by tools/make_test_mmproj.py (random, seeded: the answers are nonsense but depend on
the image, as in test_vision.py). A pull downloads the projector too; the pulled name then answers an
image with the same tokens as ``Model.load(path, mmproj=the file)``, in Python, in ``mullama run`` and
through the server's ollama API.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import ollama
import pytest
from hf_server import HFServer
from mullama_server import MullamaServer

import mullama
from mullama.hub import _cache, _catalog, _download, _pull
from mullama.native import _library

REPO = Path(__file__).resolve().parent.parent
VISION_REPO = "test-org/SmolVLM-135M-GGUF"
TEXT_REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct-Q4_K_M.gguf"  # the real model's bytes under a Q4_K_M name
PROJECTOR = "mmproj-SmolVLM-135M-Q8_0.gguf"  # the one llama.cpp picks for a Q4 model: closest in bits
OTHER_PROJECTOR = "mmproj-SmolVLM-135M-F16.gguf"
NAME = f"hf:{VISION_REPO}:{FILE}"
QUESTION = "What is in this image?"


def make_projector(out: Path, model_path: Path, seed: int) -> Path:
    subprocess.run([sys.executable, str(REPO / "tools" / "make_test_mmproj.py"), str(out), "--for", str(model_path),
                    "--seed", str(seed)], check=True, capture_output=True, text=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def projectors(tmp_path_factory, model_path) -> dict[str, Path]:
    """Two different projectors for SmolLM2 (different seeds), to tell which one a pull chose."""
    directory = tmp_path_factory.mktemp("projectors")
    return {PROJECTOR: make_projector(directory / PROJECTOR, model_path, 0),
            OTHER_PROJECTOR: make_projector(directory / OTHER_PROJECTOR, model_path, 1)}


@pytest.fixture(scope="module")
def image(build) -> Path:
    return Path(build.manifest["source"]) / "tools" / "mtmd" / "test-1.jpeg"


@pytest.fixture()
def hub(tmp_path, monkeypatch, model_path, projectors):
    server = HFServer()
    server.add(VISION_REPO, FILE, model_path)
    server.add(VISION_REPO, OTHER_PROJECTOR, projectors[OTHER_PROJECTOR])
    server.add(VISION_REPO, PROJECTOR, projectors[PROJECTOR])
    server.add(TEXT_REPO, FILE, model_path)
    server.serve_as_hub(monkeypatch, tmp_path / "home")
    yield server
    server.stop()


def child_env() -> dict[str, str]:
    """A child process's environment: this one's (the mirror, the cache), with the library already built."""
    return dict(os.environ, MULLAMA_LIBRARY_PATH=str(_library.get().path))


def mullama_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mullama", *args], capture_output=True, text=True, env=child_env(),
                          timeout=300, check=False, stdin=subprocess.DEVNULL)


def image_messages(image: Path) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                         {"type": "image_url", "image_url": {"url": str(image)}}]}]


def greedy(model: mullama.Model, image: Path, max_tokens: int = 12) -> tuple[list[int], str, int]:
    """The greedy answer's token ids and text, and the prompt's token count."""
    with mullama.Context(model, n_ctx=1024) as context:
        stream = context.chat_stream(image_messages(image), max_tokens=max_tokens, temperature=0)
        tokens = list(stream)
    return [t.id for t in tokens], "".join(t.text for t in tokens), stream.prompt_tokens


def files_in(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "home" / "models").rglob("*") if p.is_file() and p.suffix != ".lock")


def test_choose_projector_follows_llama_cpp():
    """find_best_mmproj of the pinned common/download.cpp: the directory first, then the closest bits."""
    files = ("m-Q4_K_M.gguf", "m-F16.gguf", "mmproj-F16.gguf", "mmproj-Q8_0.gguf", "mmproj-BF16.gguf")
    assert _catalog.choose_projector(files, "m-Q4_K_M.gguf") == "mmproj-Q8_0.gguf"
    assert _catalog.choose_projector(files, "m-F16.gguf") == "mmproj-F16.gguf"  # the first of equals
    assert _catalog.choose_projector(files, "m.gguf") == "mmproj-Q8_0.gguf"  # no tag: 0 bits
    nested = ("q4/m-Q4_K_M.gguf", "mmproj-Q8_0.gguf", "q4/mmproj-F16.gguf", "other/mmproj-Q4_0.gguf")
    assert _catalog.choose_projector(nested, "q4/m-Q4_K_M.gguf") == "q4/mmproj-F16.gguf"  # deepest wins
    assert _catalog.choose_projector(nested[1:], "m-Q4_K_M.gguf") == "mmproj-Q8_0.gguf"  # never a subdirectory
    assert _catalog.choose_projector(("m-Q4_K_M.gguf", "imatrix.gguf"), "m-Q4_K_M.gguf") is None


def test_a_pulled_projector_answers_an_image_like_the_file(hub, tmp_path, model_path, projectors, image):
    path = _pull.pull(f"hf:{VISION_REPO}", quiet=True)  # no file given: the model, then its projector
    assert path.name == FILE
    (cached,) = _cache.list_models()
    projector = cached.projector
    assert projector is not None and projector.complete and projector.file == PROJECTOR
    assert projector.path.parent == path.parent and projector.sha256 == hub.files[f"{VISION_REPO}/{PROJECTOR}"].sha256
    assert projector.path.read_bytes() == projectors[PROJECTOR].read_bytes()
    assert len(hub.gets(PROJECTOR)) == 1 and hub.gets(OTHER_PROJECTOR) == []
    listings = [r for r in hub.requests if "/api/models/" in r.path]
    assert len(listings) == 1  # the model's choice and the projector's share one listing
    assert files_in(tmp_path) == sorted([FILE, PROJECTOR, "index.json"])

    with mullama.Model.load(model_path, mmproj=projectors[PROJECTOR]) as by_path:
        expected = greedy(by_path, image)
    with mullama.Model.load(NAME) as by_name:  # cached: no request, and the projector comes with it
        assert by_name.supports_vision and by_name.projector.path == projector.path
        assert greedy(by_name, image) == expected
    assert expected[2] > 16  # the image's 16 embeddings are in the prompt
    with mullama.Model.load(NAME, mmproj=False) as text_only:  # --no-mmproj
        assert text_only.projector is None and not text_only.supports_vision
        with pytest.raises(mullama.MediaError):
            greedy(text_only, image)
    with mullama.Model.load(NAME, mmproj=projectors[OTHER_PROJECTOR]) as explicit:  # an explicit one wins
        assert explicit.projector.path == projectors[OTHER_PROJECTOR]
        assert greedy(explicit, image) != expected
    assert _pull.pull(NAME, quiet=True) == path  # pulled again: nothing is fetched
    assert len(hub.gets(PROJECTOR)) == 1 and len(hub.gets(FILE)) == 1


def test_a_repository_name_finds_its_pulled_file_without_asking_hugging_face(hub, image):
    """`mullama pull hf:owner/repo`, then `run`/`show`/`Model.load` of the same name (as docs/vision.md
    shows them) use the pulled file and its projector with Hugging Face out of reach: which file the
    name means is asked only when nothing of the repository is in the cache."""
    repo_name = f"hf:{VISION_REPO}"
    path = _pull.pull(repo_name, quiet=True)
    hub.stop()  # no Hugging Face from here on
    assert _cache.cached(repo_name) == path == _pull.resolve(repo_name)
    assert _cache.cached(f"hf:{VISION_REPO}@main") == path  # the default revision, named
    assert _cache.cached(f"hf:{TEXT_REPO}") is None and _cache.cached(f"hf:{VISION_REPO}@v2") is None
    with mullama.Model.load(repo_name) as model:
        assert model.supports_vision and model.projector.path.name == PROJECTOR
        assert greedy(model, image)[2] > 16
    shown = mullama_cli("show", repo_name, "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["path"] == str(path) and summary["projector"].endswith(PROJECTOR)
    with pytest.raises(mullama.DownloadError):  # not pulled: asking is the only way, and it fails clearly
        _pull.resolve(f"hf:{TEXT_REPO}")


def test_a_repository_without_a_projector_is_unchanged(hub, tmp_path):
    path = _pull.pull(f"hf:{TEXT_REPO}", quiet=True)
    (cached,) = _cache.list_models()
    assert cached.projector is None and _cache._read_index()[cached.name]["projector"] is None
    assert files_in(tmp_path) == sorted([FILE, "index.json"])
    requests = len(hub.requests)
    assert _pull.pull(cached.name, quiet=True) == path
    assert len(hub.requests) == requests  # known to have none: not asked again
    with mullama.Model.load(cached.name) as model:
        assert model.projector is None and not model.supports_vision


def test_cli_pull_list_show_run_and_rm_remove_both(hub, tmp_path, model_path, projectors, image):
    pulled = mullama_cli("pull", NAME)
    assert pulled.returncode == 0, pulled.stderr
    assert f"comes with the projector {PROJECTOR}" in pulled.stderr
    (listed,) = json.loads(mullama_cli("list", "--json").stdout)
    assert listed["projector"]["file"] == PROJECTOR and listed["projector"]["complete"] is True
    assert listed["projector"]["size"] == projectors[PROJECTOR].stat().st_size
    table = mullama_cli("list").stdout
    assert "PROJECTOR" in table and "1.8 MB" in table
    shown = json.loads(mullama_cli("show", NAME, "--json").stdout)
    assert shown["projector"] == listed["projector"]["path"]

    with mullama.Model.load(model_path, mmproj=projectors[PROJECTOR]) as by_path:
        _, text, prompt_tokens = greedy(by_path, image)
    ran = mullama_cli("run", NAME, "--image", str(image), "--temp", "0", "-n", "12", "--json", QUESTION)
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert (result["text"], result["prompt_tokens"]) == (text, prompt_tokens)
    refused = mullama_cli("run", NAME, "--no-mmproj", "--image", str(image), QUESTION)
    assert refused.returncode != 0 and "--no-mmproj" in refused.stderr
    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "mullama", "chat", NAME], env=child_env(), encoding="utf-8",
                          timeout=300, dimensions=(40, 200))
    child.expect(">>> ")
    child.sendline(f"/image {image}")
    child.expect("will go with your next message")  # (a model without a projector says it takes no images)
    child.expect(">>> ")  # reading again: a Ctrl-D sent before readline is set up can be lost
    child.sendeof()
    child.expect(pexpect.EOF)

    removed = mullama_cli("rm", NAME)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(mullama_cli("list", "--json").stdout) == []
    assert files_in(tmp_path) == ["index.json"]


def test_an_interrupted_projector_download_leaves_the_model_usable_and_resumes(hub, tmp_path, monkeypatch, capsys):
    served = hub.files[f"{VISION_REPO}/{PROJECTOR}"]
    served.drop_after, served.drops_left = 300_000, _download.RETRIES
    monkeypatch.setattr(_download.time, "sleep", lambda s: None)
    # Blocks of 64 KiB, not 1 MiB: a dropped connection keeps what reached the disk in whole blocks
    # (a torn last block is fetched again), and the projector is only 1.8 MB.
    monkeypatch.setattr(_download, "CHUNK", 1 << 16)
    path = _pull.pull(NAME, quiet=True)  # the model is there; the projector is not
    assert "the projector of" in capsys.readouterr().err
    (cached,) = _cache.list_models()
    assert cached.projector is not None and not cached.projector.complete
    (part,) = (tmp_path / "home" / "models").rglob("*.part")
    held = part.stat().st_size
    assert part.name == PROJECTOR + ".part" and 300_000 <= held < served.size
    assert not cached.projector.path.exists()  # nothing half-written under the final name
    with mullama.Model.load(NAME) as model:  # usable, without images, and it says how to finish
        assert model.projector is None and model.path == path
    assert f"`mullama pull {NAME}` resumes it" in capsys.readouterr().err
    assert len(hub.gets(PROJECTOR)) == _download.RETRIES  # loading a cached model reached no network

    _pull.pull(NAME, quiet=True)  # an explicit pull finishes it, from where it stopped
    assert hub.gets(PROJECTOR)[-1].headers["Range"] == f"bytes={held}-"
    (cached,) = _cache.list_models()
    assert cached.projector.complete and _download.sha256_file(cached.projector.path) == served.sha256
    assert list((tmp_path / "home" / "models").rglob("*.part")) == []
    assert len(hub.gets(FILE)) == 1


def test_a_projector_that_fails_its_digest_leaves_nothing_of_it(hub, tmp_path, capsys):
    hub.files[f"{VISION_REPO}/{PROJECTOR}"].wrong_digest = True
    path = _pull.pull(NAME, quiet=True)
    assert "sha256" in capsys.readouterr().err
    assert files_in(tmp_path) == sorted([FILE, "index.json"])  # no projector, no .part: only the model
    (cached,) = _cache.list_models()
    assert cached.path == path and not cached.projector.complete
    with mullama.Model.load(NAME) as model:
        assert model.projector is None and model.vocab_size == 49152


def test_the_server_says_vision_and_answers_images_with_the_pulled_projector(hub, model_path, projectors, image):
    _pull.pull(NAME, quiet=True)
    with mullama.Model.load(model_path, mmproj=projectors[PROJECTOR]) as by_path:
        _, text, prompt_tokens = greedy(by_path, image)
    server = MullamaServer(None, parallel=1, extra=("--models", f"{NAME},hf:{TEXT_REPO}:{FILE}"), env=child_env())
    try:
        tags = {m["name"]: m for m in server.get_json("/api/tags")["models"]}
        assert tags[NAME]["details"]["families"] == ["llama", "clip"]
        status, shown = server.post("/api/show", {"model": NAME})
        assert status == 200 and shown["capabilities"] == ["completion", "tools", "vision"]
        assert shown["projector_info"]["clip.has_vision_encoder"] is True
        assert ollama.Client(host=server.url).show(NAME).capabilities == shown["capabilities"]  # the client reads it
        encoded = base64.b64encode(image.read_bytes()).decode()
        status, answer = server.post("/api/chat", {
            "model": NAME, "stream": False, "options": {"temperature": 0, "num_predict": 12},
            "messages": [{"role": "user", "content": QUESTION, "images": [encoded]}]})
        assert status == 200, answer
        assert (answer["message"]["content"], answer["prompt_eval_count"]) == (text, prompt_tokens)
        # a model pulled from a repository without a projector says completion only (it is not pulled here)
        status, shown = server.post("/api/show", {"model": f"hf:{TEXT_REPO}:{FILE}"})
        assert status == 200 and shown["capabilities"] == ["completion"]
        with urllib.request.urlopen(server.url + "/health", timeout=30) as response:
            assert response.status == 200
    finally:
        server.close()
