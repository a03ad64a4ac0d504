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
    "from mullama.generate._engine import Engine\ne = Engine(m, parallel=2, n_ctx=1024)",
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


# --- use after close: ClosedError, never a call into C ------------------------------------------
MESSAGES = [{"role": "user", "content": "Hi"}]
CLOSED_CALLS = {
    "vocab_size": lambda m: m.vocab_size,
    "n_ctx_train": lambda m: m.n_ctx_train,
    "n_params": lambda m: m.n_params,
    "size_bytes": lambda m: m.size_bytes,
    "description": lambda m: m.description,
    "bos_token_id": lambda m: m.bos_token_id,
    "eos_token_id": lambda m: m.eos_token_id,
    "add_bos": lambda m: m.add_bos,
    "chat_template": lambda m: m.chat_template,
    "metadata": lambda m: m.metadata,
    "ptr": lambda m: m.ptr,
    "ensure_open": lambda m: m.ensure_open(),
    "apply_chat_template": lambda m: m.apply_chat_template(MESSAGES),
    "apply_chat_template(template=...)": lambda m: m.apply_chat_template(MESSAGES, template="{{ 'x' }}"),
    "tokenize": lambda m: m.tokenize("Hello"),
    "token_to_piece": lambda m: m.token_to_piece(1000),
    "token_to_piece(special=True)": lambda m: m.token_to_piece(1, special=True),
    "detokenize": lambda m: m.detokenize([1000, 1001]),
    "is_eog": lambda m: m.is_eog(2),
    "_cached_piece (a token cached before close)": lambda m: m._cached_piece(1000),
    "_cached_piece (a new token)": lambda m: m._cached_piece(1002),
    "_check_tokens": lambda m: m._check_tokens([1]),
    "Context(model)": lambda m: mullama.Context(m),
    "embed": lambda m: m.embed(["Hello"]),
    "embed(token ids)": lambda m: m.embed([[1000, 1001]]),
    "embed_one": lambda m: m.embed_one("Hello"),
    "n_embd": lambda m: m.n_embd,
    "pooling": lambda m: m.pooling,
    "generative": lambda m: m.generative,
    "eog_tokens": lambda m: m.eog_tokens(),
    "load_lora": lambda m: m.load_lora(m.path),
    "rerank": lambda m: m.rerank("query", ["document"]),
}
# Plain Python state, no C behind it: usable after close.
OPEN_AFTER_CLOSE = {"close", "closed", "load", "path", "offloaded", "needs_checkpoints", "vocab_only", "lora",
                    "projector", "supports_vision", "supports_audio"}  # Python state: None, False after close


@pytest.fixture(scope="module")
def closed_model(model_path):
    model = mullama.Model.load(model_path)
    assert model._cached_piece(1000) == model.token_to_piece(1000)  # in the streaming cache
    model.close()
    return model


@pytest.mark.parametrize("call", list(CLOSED_CALLS))
def test_every_use_of_a_closed_model_raises_closed_error(closed_model, call):
    """m.close(); m.token_to_piece(1000) used to be a segfault."""
    with pytest.raises(mullama.ClosedError) as info:
        CLOSED_CALLS[call](closed_model)
    assert info.value.code == "CLOSED"


def test_the_closed_model_list_covers_the_whole_api(closed_model):
    public = {name for name in dir(closed_model) if not name.startswith("_")}
    covered = {call.split("(")[0].split(" ")[0] for call in CLOSED_CALLS}
    assert public - OPEN_AFTER_CLOSE - covered == set()
    assert "closed" in repr(closed_model) and closed_model.closed


@pytest.mark.parametrize("token", [49152, 100_000, -1, 2**40])
def test_token_ids_out_of_range_are_refused_before_llama_cpp(model, token):
    """llama.cpp throws std::out_of_range through its C API for such ids: the process aborted."""
    for call in (model.token_to_piece, model._cached_piece, model.is_eog):
        with pytest.raises(mullama.TokenizeError) as info:
            call(token)
        assert info.value.code == "TOKENIZE_ERROR" and "out of range" in str(info.value)


@pytest.mark.parametrize("name", ["a" * 300 + ".gguf", "dir/" + "b" * 300 + ".gguf", "a\0b.gguf", "x" * 300,
                                  "c\0d"])
def test_hostile_paths_give_model_load_errors(name):
    """A name too long for the file system or holding a NUL: MullamaError, never OSError / ValueError."""
    with pytest.raises(mullama.MullamaError) as info:
        mullama.Model.load(name)
    assert info.value.code in ("MODEL_LOAD_ERROR", "MODEL_NOT_FOUND")
    if "\0" not in name:  # (a NUL cannot be passed on a command line)
        result = subprocess.run([sys.executable, "-m", "mullama", "show", name], capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert "MODEL_LOAD_ERROR" in result.stderr or "MODEL_NOT_FOUND" in result.stderr
