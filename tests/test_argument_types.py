"""Arguments of the wrong type are InvalidConfigError (INVALID_CONFIG) naming the argument and the type it
takes, raised before any work: never a bare TypeError or ValueError from pathlib, memoryview or dict()."""

from __future__ import annotations

import asyncio

import pytest

import mullama

MESSAGES = [{"role": "user", "content": "Hi"}]

# (the call, the argument the message names, what it says the argument must be)
CONTEXT_CALLS = {
    "load_state_bytes str": (lambda ctx: ctx.load_state_bytes("abc"), "data", "bytes"),
    "load_state_bytes None": (lambda ctx: ctx.load_state_bytes(None), "data", "bytes"),
    "save_state None": (lambda ctx: ctx.save_state(None), "path", "a str or an os.PathLike"),
    "save_state int": (lambda ctx: ctx.save_state(123), "path", "a str or an os.PathLike"),
    "load_state None": (lambda ctx: ctx.load_state(None), "path", "a str or an os.PathLike"),
    "chat_stream chat_template_kwargs": (lambda ctx: ctx.chat_stream(MESSAGES, 4, chat_template_kwargs="x"),
                                         "chat_template_kwargs", "a dict with str keys"),
    "decode None": (lambda ctx: ctx.decode(None), "tokens", "a list of int token ids"),
}

MODEL_CALLS = {
    "detokenize None": (lambda model: model.detokenize(None), "tokens", "a list of int token ids"),
    "detokenize str": (lambda model: model.detokenize("abc"), "tokens", "a list of int token ids"),
    "detokenize a str id": (lambda model: model.detokenize([1, "2"]), "a token id", "an int"),
    "token_to_piece str": (lambda model: model.token_to_piece("a"), "a token id", "an int"),
    "is_eog str": (lambda model: model.is_eog("x"), "a token id", "an int"),
}


@pytest.fixture(scope="module")
def context(model):
    with mullama.Context(model, n_ctx=512, warmup=False) as ctx:
        yield ctx


def assert_names_the_argument(error: pytest.ExceptionInfo, argument: str, expected: str) -> None:
    message = str(error.value)
    assert error.value.code == "INVALID_CONFIG", message
    assert message.startswith(f"{argument} must be ") and expected in message, message


@pytest.mark.parametrize("case", sorted(CONTEXT_CALLS))
def test_context_arguments_of_the_wrong_type(context, case):
    call, argument, expected = CONTEXT_CALLS[case]
    with pytest.raises(mullama.InvalidConfigError) as error:
        call(context)
    assert_names_the_argument(error, argument, expected)


@pytest.mark.parametrize("case", sorted(MODEL_CALLS))
def test_model_arguments_of_the_wrong_type(model, case):
    call, argument, expected = MODEL_CALLS[case]
    with pytest.raises(mullama.InvalidConfigError) as error:
        call(model)
    assert_names_the_argument(error, argument, expected)
    assert "out of range" not in str(error.value)


def test_a_token_id_of_the_right_type_out_of_range_is_still_a_tokenize_error(model):
    with pytest.raises(mullama.TokenizeError, match="out of range"):
        model.token_to_piece(model.vocab_size)


def test_the_context_still_works_after_refusing_them(context, tmp_path):
    """Each refusal came before any work: the cache and a saved state are as they were."""
    context.generate("Hello", max_tokens=2, temperature=0)
    assert context.save_state(tmp_path / "state.bin") > 0
    with pytest.raises(mullama.InvalidConfigError):
        context.load_state_bytes("abc")
    assert context.load_state(tmp_path / "state.bin")


def test_async_chat_stream_refuses_bad_template_kwargs_at_once(model):
    """On the event loop, when the stream is made: not later, from a worker thread."""
    async_model = mullama.AsyncModel(model, n_ctx=512, parallel=1)
    with pytest.raises(mullama.InvalidConfigError) as error:
        async_model.chat_stream(MESSAGES, 4, chat_template_kwargs=["x"])
    assert_names_the_argument(error, "chat_template_kwargs", "a dict with str keys")
    assert async_model.engine is None  # refused before any engine was started
    asyncio.run(async_model.aclose())
    assert not model.closed  # the session's model, passed in: still the caller's
