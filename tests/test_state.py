"""Saved KV states: Context.save_state/load_state (and bytes), and the server's /slots save, restore
and erase. Real library, real models (SmolLM2; Gemma 3 270M for a state of the wrong model)."""

from __future__ import annotations

import os

import pytest

import mullama
from mullama.hub import _pull

PROMPT = "The three primary colors are"


def tokens_of(stream) -> list[int]:
    with stream:
        return [token.id for token in stream]


@pytest.fixture(scope="module")
def saved(model):
    """A context that completed PROMPT (greedy), its state's bytes, and the next prompt."""
    with mullama.Context(model, n_ctx=512) as context:
        first = context.generate(PROMPT, max_tokens=12, temperature=0, timeout_ms=None)
        data = context.state_bytes()
        yield context, data, PROMPT + first.text + " Then"


def test_bytes_round_trip_continues_token_for_token(model, saved):
    original, data, follow_up = saved
    cached = list(original.cached_tokens)
    with mullama.Context(model, n_ctx=512) as fresh:
        assert fresh.load_state_bytes(data) == cached
        assert fresh.cached_tokens == cached
        assert fresh.state_bytes() == data  # the same state, byte for byte
        stream = fresh.generate_stream(follow_up, max_tokens=24, temperature=0, timeout_ms=None)
        restored = tokens_of(stream)
        assert stream.cached_tokens == len(cached)  # only the new tokens were decoded
    reference = original.generate_stream(follow_up, max_tokens=24, temperature=0, timeout_ms=None)
    assert restored == tokens_of(reference)
    assert reference.cached_tokens == len(cached)


def test_file_round_trip(model, tmp_path):
    path = tmp_path / "session.state"
    with mullama.Context(model, n_ctx=512) as original:
        first = original.generate(PROMPT, max_tokens=8, temperature=0, timeout_ms=None)
        written = original.save_state(path)
        assert written == path.stat().st_size
        assert os.listdir(tmp_path) == ["session.state"]  # no temporary file left
        with mullama.Context(model, n_ctx=512) as fresh:
            assert fresh.load_state(path) == original.cached_tokens
            follow_up = PROMPT + first.text
            assert tokens_of(fresh.generate_stream(follow_up, max_tokens=16, temperature=0, timeout_ms=None)) == \
                tokens_of(original.generate_stream(follow_up, max_tokens=16, temperature=0, timeout_ms=None))


def test_an_empty_context_round_trips(model):
    with mullama.Context(model, n_ctx=256) as empty, mullama.Context(model, n_ctx=256) as other:
        other.decode(model.tokenize("Hello"))
        assert other.load_state_bytes(empty.state_bytes()) == []
        assert other.cached_tokens == []
        assert other.generate("Hello", max_tokens=4, temperature=0, timeout_ms=None).text


@pytest.fixture(scope="module")
def gemma():
    """Gemma 3 270M: another architecture, with sliding-window attention."""
    with mullama.Model.load(_pull.resolve("gemma3:270m")) as loaded:
        yield loaded


def test_round_trip_with_sliding_window_attention(gemma):
    with mullama.Context(gemma, n_ctx=512) as original, mullama.Context(gemma, n_ctx=512) as fresh:
        first = original.generate(PROMPT, max_tokens=10, temperature=0, timeout_ms=None)
        cached = original.cached_tokens
        assert fresh.load_state_bytes(original.state_bytes()) == cached
        follow_up = PROMPT + first.text + " Then"
        restored = fresh.generate_stream(follow_up, max_tokens=16, temperature=0, timeout_ms=None)
        assert tokens_of(restored) == tokens_of(original.generate_stream(follow_up, max_tokens=16, temperature=0,
                                                                         timeout_ms=None))
        assert restored.cached_tokens == len(cached)  # only the new tokens were decoded


def test_wrong_model_is_refused(saved, gemma):
    _, data, _ = saved
    with mullama.Context(gemma, n_ctx=512) as context:
        context.decode(gemma.tokenize("Hello there"))
        before = context.cached_tokens
        with pytest.raises(mullama.StateModelMismatchError) as caught:
            context.load_state_bytes(data)
        assert caught.value.code == "STATE_MODEL_MISMATCH"
        assert "SmolLM2" in str(caught.value) and "gemma" in str(caught.value)
        assert context.cached_tokens == before  # a refused state leaves the cache as it was
        assert context.generate("Hello there", max_tokens=3, temperature=0, timeout_ms=None).text


@pytest.mark.parametrize("cut", [1, 32, 1000])
def test_truncated_state_is_refused(model, saved, cut):
    _, data, _ = saved
    with mullama.Context(model, n_ctx=512) as context:
        with pytest.raises(mullama.StateCorruptError) as caught:
            context.load_state_bytes(data[:-cut])
        assert caught.value.code == "STATE_CORRUPT"
        with pytest.raises(mullama.StateCorruptError):
            context.load_state_bytes(data[:20])


def test_damaged_state_is_refused(model, saved):
    _, data, _ = saved
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x55
    with mullama.Context(model, n_ctx=512) as context:
        with pytest.raises(mullama.StateCorruptError):
            context.load_state_bytes(bytes(damaged))


@pytest.mark.parametrize("garbage", [b"", b"hello", b"GGUF" + bytes(100), os.urandom(4096)])
def test_not_a_state_file(model, tmp_path, garbage):
    path = tmp_path / "garbage.bin"
    path.write_bytes(garbage)
    with mullama.Context(model, n_ctx=256) as context:
        with pytest.raises(mullama.NotAStateFileError) as caught:
            context.load_state(path)
        assert caught.value.code == "NOT_A_STATE_FILE"
        with pytest.raises(mullama.NotAStateFileError):
            context.load_state(tmp_path)  # a directory
        with pytest.raises(mullama.StateError):
            context.load_state(tmp_path / "missing.state")


def test_the_model_file_is_not_a_state(model, model_path):
    with mullama.Context(model, n_ctx=256) as context, pytest.raises(mullama.StateError):
        context.load_state(model_path)


def test_state_larger_than_the_context_is_refused(model):
    with mullama.Context(model, n_ctx=1024) as big, mullama.Context(model, n_ctx=256) as small:
        big.decode(model.tokenize("word " * 300))
        data = big.state_bytes()
        with pytest.raises(mullama.ContextOverflowError) as caught:
            small.load_state_bytes(data)
        assert caught.value.code == "CONTEXT_OVERFLOW"
        assert small.cached_tokens == []


def test_save_is_atomic(model, tmp_path):
    target = tmp_path / "conversation.state"
    with mullama.Context(model, n_ctx=256) as context:
        context.decode(model.tokenize("First version"))
        context.save_state(target)
        first = target.read_bytes()
        context.decode(model.tokenize(" and more"))
        context.save_state(target)  # replaced whole
        assert target.read_bytes() != first
        assert sorted(os.listdir(tmp_path)) == ["conversation.state"]
        umask = os.umask(0o022)
        os.umask(umask)
        assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600
        # A save that fails at the rename (the target is a directory) leaves nothing behind.
        blocked = tmp_path / "blocked"
        (blocked / "inside").mkdir(parents=True)
        with pytest.raises(mullama.StateError):
            context.save_state(blocked)
        assert sorted(os.listdir(tmp_path)) == ["blocked", "conversation.state"]
        with pytest.raises(mullama.StateError):
            context.save_state(tmp_path / "no" / "such" / "dir.state")
        with mullama.Context(model, n_ctx=256) as fresh:
            assert fresh.load_state(target) == context.cached_tokens


# --- the server's /slots routes ------------------------------------------------------------------
def post(url: str, body: dict | None = None) -> tuple[int, dict]:
    import requests

    response = requests.post(url, json=body, timeout=300)
    return response.status_code, response.json()


def complete(server, prompt: str, max_tokens: int) -> dict:
    status, answer = post(f"{server.url}/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0, "model": "smollm2:135m"})
    assert status == 200, answer
    return answer


@pytest.fixture(scope="module")
def slot_server(model, tmp_path_factory):
    """Our server with --slot-save-path (2 slots, no host prompt cache: a reused prefix is the slot's)."""
    from inprocess_server import serving

    from mullama.server import ServerSettings

    directory = tmp_path_factory.mktemp("slots")
    settings = ServerSettings(model_name="smollm2:135m", slot_save_path=directory.resolve())
    with serving(model, settings=settings, parallel=2, n_ctx=1024, cache_ram_mib=0) as (server, engine):
        yield server, engine, directory


def slots(server) -> list[dict]:
    import requests

    return requests.get(f"{server.url}/slots", timeout=60).json()


def test_slot_save_erase_restore_round_trip(slot_server):
    server, _engine, directory = slot_server
    first = complete(server, PROMPT, 8)
    held = {slot["id"]: slot["n_cached_tokens"] for slot in slots(server)}
    id_slot = max(held, key=held.get)
    status, saved = post(f"{server.url}/slots/{id_slot}?action=save", {"filename": "colors.bin"})
    assert status == 200, saved
    assert set(saved) == {"id_slot", "filename", "n_saved", "n_written", "timings"}
    assert saved["id_slot"] == id_slot and saved["filename"] == "colors.bin" and set(saved["timings"]) == {"save_ms"}
    assert saved["n_saved"] == held[id_slot] > 0
    assert saved["n_written"] == (directory / "colors.bin").stat().st_size
    assert sorted(os.listdir(directory)) == ["colors.bin"]

    follow_up = PROMPT + first["choices"][0]["text"] + " Then"
    reference = complete(server, follow_up, 16)  # on the slot that kept the prompt
    assert reference["usage"]["prompt_tokens_details"]["cached_tokens"] == saved["n_saved"]

    for slot in range(2):
        status, erased = post(f"{server.url}/slots/{slot}?action=erase")
        assert status == 200 and set(erased) == {"id_slot", "n_erased"} and erased["id_slot"] == slot
    assert all(slot["n_cached_tokens"] == 0 for slot in slots(server))

    other = 1 - id_slot
    status, restored = post(f"{server.url}/slots/{other}?action=restore", {"filename": "colors.bin"})
    assert status == 200, restored
    assert restored == {"id_slot": other, "filename": "colors.bin", "n_restored": saved["n_saved"],
                        "n_read": saved["n_written"], "timings": restored["timings"]}
    assert set(restored["timings"]) == {"restore_ms"}
    assert {slot["id"]: slot["n_cached_tokens"] for slot in slots(server)} == {other: saved["n_saved"], id_slot: 0}
    again = complete(server, follow_up, 16)  # lands on the restored slot: only the new tokens are decoded
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == saved["n_saved"]
    assert again["choices"][0]["text"] == reference["choices"][0]["text"]
    # llama-server's id_slot: pinned to the erased slot, the same prompt is decoded whole there
    status, pinned = post(f"{server.url}/v1/completions", {"prompt": follow_up, "max_tokens": 16, "temperature": 0,
                                                            "id_slot": id_slot})
    assert status == 200, pinned
    assert pinned["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert pinned["choices"][0]["text"] == reference["choices"][0]["text"]


@pytest.mark.parametrize("filename", ["../escape.bin", "/tmp/escape.bin", "a/b.bin", "a\\b.bin", "..", ".", "",
                                      " lead.bin", "trail.bin.", "x:y", "nul\x00.bin", "q?.bin", "a" * 256, 7, None])
def test_slot_file_names_stay_in_the_directory(slot_server, filename):
    server, _engine, directory = slot_server
    before = set(os.listdir(directory)), set(os.listdir(directory.parent))
    for action in ("save", "restore"):
        status, answer = post(f"{server.url}/slots/0?action={action}", {"filename": filename})
        assert (status, answer) == (400, {"error": {"code": 400, "message": "Invalid filename",
                                                    "type": "invalid_request_error"}})
    assert (set(os.listdir(directory)), set(os.listdir(directory.parent))) == before


def test_slot_symlink_out_of_the_directory_is_refused(slot_server, tmp_path):
    server, _engine, directory = slot_server
    link = directory / "outside.bin"
    link.symlink_to(tmp_path / "target.bin")
    try:
        status, answer = post(f"{server.url}/slots/0?action=save", {"filename": "outside.bin"})
        assert (status, answer["error"]["message"]) == (400, "Invalid filename")
        assert not (tmp_path / "target.bin").exists()
    finally:
        link.unlink()


def test_slot_errors_in_llama_server_shape(slot_server):
    server, _engine, directory = slot_server
    assert post(f"{server.url}/slots/abc?action=save", {"filename": "x.bin"})[1]["error"]["message"] == \
        "Invalid slot ID"
    assert post(f"{server.url}/slots/-1?action=erase")[1]["error"]["message"] == "Invalid slot ID"
    assert post(f"{server.url}/slots/0?action=load", {"filename": "x.bin"}) == \
        (400, {"error": {"code": 400, "message": "Invalid action", "type": "invalid_request_error"}})
    status, answer = post(f"{server.url}/slots/0?action=restore", {"filename": "missing.bin"})
    assert status == 400 and answer["error"]["message"].startswith("Unable to restore slot")
    (directory / "garbage.bin").write_bytes(b"not a state at all")
    slots_before = slots(server)
    status, answer = post(f"{server.url}/slots/0?action=restore", {"filename": "garbage.bin"})
    assert status == 400 and "not a mullama state" in answer["error"]["message"]
    assert slots(server) == slots_before  # a refused file leaves the slot as it was
    (directory / "garbage.bin").unlink()


def test_slot_file_of_another_model_is_refused(slot_server, gemma):
    server, _engine, directory = slot_server
    with mullama.Context(gemma, n_ctx=256) as context:
        context.decode(gemma.tokenize("Hello"))
        context.save_state(directory / "gemma.bin")
    try:
        status, answer = post(f"{server.url}/slots/0?action=restore", {"filename": "gemma.bin"})
        assert status == 400 and answer["error"]["type"] == "invalid_request_error"
        assert "saved by another model" in answer["error"]["message"]
    finally:
        (directory / "gemma.bin").unlink()


def test_slots_without_a_save_path(served):
    status, answer = post(f"{served.url}/slots/0?action=save", {"filename": "x.bin"})
    assert (status, answer) == (501, {"error": {
        "code": 501, "message": "This server does not support slots action. Start it with `--slot-save-path`",
        "type": "not_supported_error"}})
    listed = slots(served)
    assert [slot["id"] for slot in listed] == [0, 1]
    assert all({"id", "n_ctx", "speculative", "is_processing"} <= set(slot) for slot in listed)


def test_llama_server_answers_in_the_same_shapes(build, model_path, slot_server, tmp_path):
    """llama-server --slot-save-path on the same model: the same keys, the same errors (its files are
    llama.cpp's own format, which ours is not)."""
    import upstream

    from mullama.generate._context import default_threads

    server, _engine, _directory = slot_server
    theirs = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(), n_ctx=2048,
                                  parallel=2, extra=("--slot-save-path", str(tmp_path)))
    try:
        for url in (theirs.url, server.url):
            assert post(f"{url}/completion" if url == theirs.url else f"{url}/v1/completions",
                        {"prompt": PROMPT, "n_predict": 4, "max_tokens": 4, "temperature": 0,
                         "id_slot": 0} if url == theirs.url else
                        {"prompt": PROMPT, "max_tokens": 4, "temperature": 0})[0] == 200
        answers = []
        for url in (theirs.url, server.url):
            saved = post(f"{url}/slots/0?action=save", {"filename": "shape.bin"})
            restored = post(f"{url}/slots/1?action=restore", {"filename": "shape.bin"})
            erased = post(f"{url}/slots/1?action=erase")
            refused = post(f"{url}/slots/0?action=save", {"filename": "../shape.bin"})
            answers.append([(status, sorted(body), sorted(body.get("timings", {}))) for status, body in
                            (saved, restored, erased)] + [refused])
            listed = slots_of(url)
            answers[-1].append(sorted(set(listed[0]) & {"id", "n_ctx", "speculative", "is_processing"}))
        assert answers[0] == answers[1]
    finally:
        theirs.close()


def slots_of(url: str) -> list[dict]:
    import requests

    return requests.get(f"{url}/slots", timeout=60).json()


def test_mullama_serve_slot_save_path(model_path, tmp_path):
    """`mullama serve --slot-save-path DIR`: a slot saved by one server process is restored by another;
    a missing directory is refused at start."""
    import subprocess
    import sys

    from mullama_server import MullamaServer

    refused = subprocess.run([sys.executable, "-m", "mullama", "serve", "--model", str(model_path),
                              "--slot-save-path", str(tmp_path / "missing")], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode != 0 and "--slot-save-path: not a directory" in refused.stderr
    answers = []
    for _ in range(2):
        server = MullamaServer(model_path, parallel=1, ctx_size=1024,
                               extra=("--slot-save-path", str(tmp_path), "--cache-ram", "0"))
        try:
            if not answers:
                assert server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})[0] == 200
                status, saved = server.post("/slots/0?action=save", {"filename": "s.bin"})
                assert status == 200 and saved["n_saved"] > 0
            else:
                status, restored = server.post("/slots/0?action=restore", {"filename": "s.bin"})
                assert status == 200 and restored["n_restored"] == saved["n_saved"]
            status, answer = server.post("/v1/completions", {"prompt": PROMPT + " red,", "max_tokens": 8,
                                                             "temperature": 0})
            assert status == 200
            answers.append(answer)
        finally:
            server.close()
    assert answers[1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert answers[1]["choices"][0]["text"] == answers[0]["choices"][0]["text"]
    assert sorted(os.listdir(tmp_path)) == ["s.bin"]


def test_an_action_on_a_busy_slot_waits_for_its_request(model, tmp_path):
    """As llama-server defers it: the save runs once the slot's request has ended, and holds all of it."""
    from mullama.generate import _slots
    from mullama.generate._config import StreamConfig
    from mullama.generate._engine import Engine

    with Engine(model, parallel=1, n_ctx=512, cache_ram_mib=0) as engine:
        prompt = model.tokenize(PROMPT)
        request = engine.submit(prompt, StreamConfig(max_tokens=24, temperature=0, timeout_ms=None))
        saved = _slots.save_slot(engine, 0, tmp_path / "busy.bin")
        assert request.finish_reason is not None  # it finished before the slot was saved
        assert saved["n_saved"] == len(prompt) + request.tokens_generated() - 1  # the last token is not decoded
        assert _slots.erase_slot(engine, 0)["n_erased"] == saved["n_saved"]
        assert _slots.restore_slot(engine, 0, tmp_path / "busy.bin")["n_restored"] == saved["n_saved"]
        with pytest.raises(_slots.SlotNotFoundError):
            _slots.erase_slot(engine, -1)
        assert _slots.erase_slot(engine, 3)["id_slot"] == 3  # wraps around, as llama-server's ids do


def test_loading_ends_a_stream_still_open_on_the_context(model, saved):
    _, data, _ = saved
    with mullama.Context(model, n_ctx=512) as context:
        stream = context.generate_stream("Once upon a time", max_tokens=32, temperature=0, timeout_ms=None)
        first, _second = next(stream), next(stream)
        middle = context.state_bytes()  # between two tokens: the prompt and the first token so far
        context.load_state_bytes(data)
        with pytest.raises(mullama.ContextError):
            next(stream)
        stream.close()
        assert context.load_state_bytes(middle) == [*model.tokenize("Once upon a time"), first.id]


def test_a_state_records_its_lora_adapters(model, model_path, tmp_path):
    """Cells computed with a LoRA adapter load only where the same adapter, at the same scale, applies."""
    import subprocess
    import sys
    from pathlib import Path

    adapter = tmp_path / "qv.gguf"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parent.parent / "tools" / "make_lora.py"),
                    str(adapter), "--for", str(model_path)], check=True, capture_output=True, timeout=300)
    with mullama.Model.load(model_path, lora=[(adapter, 1.0)]) as tuned:
        with mullama.Context(tuned, n_ctx=512) as original, mullama.Context(tuned, n_ctx=512) as fresh:
            first = original.generate(PROMPT, max_tokens=8, temperature=0, timeout_ms=None)
            data = original.state_bytes()
            assert fresh.load_state_bytes(data) == original.cached_tokens
            follow_up = PROMPT + first.text
            assert tokens_of(fresh.generate_stream(follow_up, max_tokens=12, temperature=0, timeout_ms=None)) == \
                tokens_of(original.generate_stream(follow_up, max_tokens=12, temperature=0, timeout_ms=None))
            fresh.set_lora({})  # no adapter: the state's cells are not this context's
            with pytest.raises(mullama.StateModelMismatchError, match="LoRA"):
                fresh.load_state_bytes(data)
        with mullama.Context(model, n_ctx=512) as plain, pytest.raises(mullama.StateModelMismatchError) as caught:
            plain.load_state_bytes(data)  # the base model, without the adapter loaded
        assert "qv.gguf" in str(caught.value)
