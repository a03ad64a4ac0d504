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


def test_wrong_model_is_refused(saved):
    _, data, _ = saved
    with mullama.Model.load(_pull.resolve("gemma3:270m")) as gemma, mullama.Context(gemma, n_ctx=512) as context:
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
