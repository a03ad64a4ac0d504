"""Model loading, metadata, tokenizer, and clear errors for bad model files."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mullama
from mullama import ModelLoadError


def test_metadata(model):
    assert model.vocab_size == 49152
    assert model.n_ctx_train == 8192
    assert model.n_params > 100_000_000
    assert "llama" in model.description
    meta = model.metadata
    assert meta["general.architecture"] == "llama"
    assert "tokenizer.chat_template" in meta
    assert model.chat_template == meta["tokenizer.chat_template"]
    assert "<|im_start|>" in model.chat_template


@pytest.mark.parametrize("text", ["Hello, world!", "héllo wörld", "日本語のテキスト", "emoji 🍕🦀 ok",
                                  "tabs\tand\nnewlines", "  leading spaces", ""])
def test_tokenize_round_trip(model, text):
    tokens = model.tokenize(text, add_special=False)
    assert model.detokenize(tokens) == text
    pieces = b"".join(model.token_to_piece(t) for t in tokens)
    assert pieces.decode("utf-8") == text


def test_special_tokens(model):
    text = "<|im_start|>user"
    parsed = model.tokenize(text, add_special=False, parse_special=True)
    literal = model.tokenize(text, add_special=False, parse_special=False)
    im_start = parsed[0]
    assert len(parsed) < len(literal)
    assert im_start not in literal
    assert model.token_to_piece(im_start, special=True) == b"<|im_start|>"
    assert model.token_to_piece(im_start, special=False) == b""
    assert model.detokenize(parsed, unparse_special=True) == text
    assert model.is_eog(model.eos_token_id)


def test_add_special_follows_the_model(model):
    with_special = model.tokenize("hi", add_special=True)
    without = model.tokenize("hi", add_special=False)
    assert (with_special[0] == model.bos_token_id) == model.add_bos
    assert len(with_special) - len(without) == int(model.add_bos)


def test_tokenize_rejects_bad_input(model):
    with pytest.raises(mullama.TokenizeError) as info:
        model.tokenize("lone \ud800 surrogate")
    assert info.value.code == "TOKENIZE_ERROR"
    with pytest.raises(mullama.TokenizeError):
        model.tokenize(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(mullama.TokenizeError):
        model.detokenize([model.vocab_size])


def _bad_files(tmp_path, model_path):
    data = model_path.read_bytes()
    files = {
        "missing": tmp_path / "missing.gguf",
        "empty": tmp_path / "empty.gguf",
        "truncated_header": tmp_path / "truncated_header.gguf",
        "truncated_data": tmp_path / "truncated_data.gguf",
        "random": tmp_path / "random.gguf",
        "text": tmp_path / "notes.txt",
        "directory": tmp_path,
        "gguf_magic_then_garbage": tmp_path / "garbage.gguf",
    }
    files["empty"].write_bytes(b"")
    files["truncated_header"].write_bytes(data[:1000])
    files["truncated_data"].write_bytes(data[: len(data) // 2])
    files["random"].write_bytes(os.urandom(1 << 16))
    files["text"].write_text("this is not a model\n" * 100)
    files["gguf_magic_then_garbage"].write_bytes(b"GGUF" + os.urandom(1 << 16))
    return files


def test_bad_model_files_raise_model_load_error(tmp_path, model_path):
    """Each bad file gives ModelLoadError with a helpful message, in this very process."""
    for kind, path in _bad_files(tmp_path, model_path).items():
        with pytest.raises(ModelLoadError) as info:
            mullama.Model.load(path)
        assert info.value.code == "MODEL_LOAD_ERROR", kind
        assert str(path) in str(info.value), kind
    # still alive and working afterwards
    with mullama.Model.load(model_path) as model:
        assert model.vocab_size == 49152


def test_truncated_model_does_not_crash_a_fresh_process(tmp_path, model_path):
    """The truncated-data case goes through llama.cpp's own loader (mmap): prove no SIGBUS."""
    path = tmp_path / "half.gguf"
    path.write_bytes(model_path.read_bytes()[: 60_000_000])
    code = ("import mullama, sys\n"
            "try:\n    mullama.Model.load(sys.argv[1])\n"
            "except mullama.ModelLoadError as e:\n    print(e.code)\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MODEL_LOAD_ERROR"


def test_close_and_context_manager(model_path):
    model = mullama.Model.load(model_path)
    context = mullama.Context(model, n_ctx=512)
    with pytest.raises(mullama.ContextError):
        model.close()  # a context still uses it
    context.close()
    context.close()  # idempotent
    model.close()
    model.close()
    assert model.closed
    with pytest.raises(mullama.ClosedError) as info:
        model.tokenize("x")
    assert info.value.code == "CLOSED"
    with pytest.raises(mullama.ClosedError):
        mullama.Context(model)


def test_garbage_collection_frees_in_a_safe_order(model_path):
    """Dropping a model and its context together (any order) must not crash."""
    code = ("import gc, mullama, sys\n"
            "for i in range(5):\n"
            "    m = mullama.Model.load(sys.argv[1]); c = mullama.Context(m, n_ctx=256)\n"
            "    c.generate('hi', max_tokens=2)\n"
            "    del m; del c; gc.collect()\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code, str(model_path)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("scenario", [
    "c = mullama.Context(m); list(c.generate_stream('Hi', max_tokens=4))",
    "import asyncio\nam = mullama.AsyncModel(m)\nasync def go():\n"
    "    async for t in am.generate_stream('Hi', max_tokens=4): pass\nasyncio.run(go())",
    "from mullama._engine import Engine\ne = Engine(m, parallel=2, n_ctx=1024)",
])
def test_exiting_without_closing_anything_does_not_crash(model_path, scenario):
    """llama.cpp logs while freeing: it must never call a log callback that teardown destroyed."""
    code = ("import logging, sys, mullama\n"
            "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)\n"
            f"m = mullama.Model.load(sys.argv[1])\n{scenario}\nprint('ok')\n")
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", code, str(model_path)], capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == "ok"
