"""The sync streaming API: exact text, stop sequences, config, early stop, timeouts, statistics."""

from __future__ import annotations

import gc
import threading

import pytest
from test_greedy_upstream import PROMPTS

import mullama
from mullama import StreamConfig
from mullama._text import TextAssembler

GREEDY = StreamConfig(max_tokens=48, temperature=0)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_stream_equals_upstream_and_concatenates_exactly(prompt, context, model, llama_server):
    reference = llama_server.greedy(prompt, 48)
    stream = context.generate_stream(prompt, config=GREEDY)
    tokens = list(stream)
    assert [t.id for t in tokens] == reference["tokens"]
    text = "".join(t.text for t in tokens)
    assert text == reference["content"] == stream.text
    visible = [t for t in reference["tokens"] if not model.is_eog(t)]
    assert text == model.detokenize(visible)
    # No character comes out broken; only a stream cut by max_tokens inside a character's bytes
    # ends with U+FFFD for them, as upstream's content does.
    assert "\ufffd" not in text.removesuffix("\ufffd")
    if text.endswith("\ufffd"):
        assert stream.finish_reason == "length"
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert tokens[-1].finish_reason == stream.finish_reason in ("stop", "length")
    assert all(t.finish_reason is None for t in tokens[:-1])


def test_multibyte_characters_split_over_tokens_come_out_whole(context, model):
    prompt = "Emoji: 🍕🦀🎉🇫🇷 and more emoji:"
    tokens = list(context.generate_stream(prompt, max_tokens=40, temperature=0))
    ids = [t.id for t in tokens if not model.is_eog(t.id)]
    text = "".join(t.text for t in tokens)
    assert text == model.detokenize(ids)
    for token in tokens:
        token.text.encode("utf-8")  # every piece of text is valid on its own
    # Only bytes left incomplete when max_tokens cut the last character may become U+FFFD.
    assert "\ufffd" not in text.rstrip("\ufffd")
    # the prompt's own tokens prove the model splits emoji into byte tokens
    prompt_pieces = [model.token_to_piece(t) for t in model.tokenize(prompt, add_special=False)]
    assert any(not _is_whole_utf8(p) for p in prompt_pieces)
    # and the output has characters whose bytes came in several tokens, each shown once
    assert any(not _is_whole_utf8(model.token_to_piece(t.id)) for t in tokens)
    assert sum(1 for t in tokens if t.text == "") > 0


def _is_whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("text", ["известни", "⊕ ⊻ ∧ ¬", "a ,b", "hello\nworld", "日本語テキスト🍕🦀",
                                  "mixed é 🇫🇷 flags"])
def test_assembler_joins_every_byte_split_exactly(text):
    data = text.encode("utf-8")
    for size in (1, 2, 3, 5):
        assembler = TextAssembler()
        out = [assembler.feed(data[i:i + size]) for i in range(0, len(data), size)]
        out.append(assembler.flush())
        assert "".join(out) == text
        assert all("\ufffd" not in part for part in out)


def test_assembler_stop_sequences_split_over_pieces():
    text = "alpha beta END gamma"
    data = text.encode()
    for size in (1, 2, 3, 4):
        assembler = TextAssembler(["END", "never"])
        out = []
        for i in range(0, len(data), size):
            out.append(assembler.feed(data[i:i + size]))
            if assembler.stopped:
                break
        assert "".join(out) == "alpha beta "
        assert assembler.stop_sequence == "END"


def test_assembler_releases_a_false_start_of_a_stop_sequence():
    assembler = TextAssembler(["STOP"])
    out = [assembler.feed(p) for p in (b"ST", b"O", b"RY ", b"ST")]
    out.append(assembler.flush())
    assert "".join(out) == "STORY ST"
    assert not assembler.stopped


def _stop_split_over_tokens(context, model):
    """A stop sequence that the greedy completion spans over at least two tokens."""
    prompt = PROMPTS[1]
    full = list(context.generate_stream(prompt, max_tokens=40, temperature=0))
    pieces = [model.token_to_piece(t.id).decode("utf-8", "replace") for t in full]
    for i in range(5, len(pieces) - 2):
        candidate = pieces[i][-2:] + pieces[i + 1] + pieces[i + 2][:2]
        if len(candidate.strip()) >= 5 and pieces[i][-2:] and pieces[i + 2][:2]:
            return prompt, candidate, "".join(pieces)
    raise AssertionError("no multi-token span found")


def test_stop_sequence_split_across_tokens_is_caught_and_never_leaks(context, model):
    prompt, stop, full_text = _stop_split_over_tokens(context, model)
    stream = context.generate_stream(prompt, max_tokens=40, temperature=0, stop_sequences=[stop])
    text = "".join(t.text for t in stream)
    assert stop not in text
    assert text == full_text[: full_text.index(stop)]
    assert stream.finish_reason == "stop"
    assert stream.stop_sequence == stop
    for prefix_len in range(1, len(stop)):
        assert not text.endswith(stop[:prefix_len]) or full_text[: len(text)].endswith(stop[:prefix_len])


def test_config_defaults_match_the_seed():
    config = StreamConfig()
    assert (config.max_tokens, config.temperature, config.top_k, config.top_p, config.stop_sequences,
            config.buffer_size, config.timeout_ms) == (256, 1.0, 40, 0.9, [], 64, 30000)


@pytest.mark.parametrize("field, value", [
    ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", "10"), ("max_tokens", True),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "hot"),
    ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("top_p", None),
    ("stop_sequences", [1]), ("stop_sequences", [""]), ("stop_sequences", 5), ("stop_sequences", [None]),
    ("buffer_size", 0), ("buffer_size", -3), ("timeout_ms", 0), ("timeout_ms", -1), ("timeout_ms", "soon"),
    ("seed", -1), ("seed", 2**40), ("min_p", 2.0), ("repeat_penalty", 0), ("frequency_penalty", 5),
])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(mullama.InvalidConfigError) as info:
        StreamConfig(**{field: value})
    assert info.value.code == "INVALID_CONFIG"
    assert field in str(info.value)


def test_invalid_options_to_generate_stream(context):
    with pytest.raises(mullama.InvalidConfigError):
        context.generate_stream("hi", max_tokens=-5)
    with pytest.raises(mullama.InvalidConfigError):
        context.generate_stream("hi", no_such_option=1)
    with pytest.raises(mullama.InvalidConfigError):
        context.generate_stream(42)  # type: ignore[arg-type]
    with pytest.raises(mullama.InvalidConfigError):
        context.generate_stream("hi", config="fast")  # type: ignore[arg-type]


def test_call_forms(context):
    assert len(list(context.generate_stream("Hi", 3, temperature=0))) <= 3
    assert len(list(context.generate_stream("Hi", max_tokens=3))) <= 3
    config = StreamConfig(max_tokens=3, temperature=0)
    assert len(list(context.generate_stream("Hi", config=config))) <= 3
    assert len(list(context.generate_stream("Hi", config))) <= 3


def test_seeded_sampling_is_reproducible(context):
    config = StreamConfig(max_tokens=24, temperature=0.9, seed=1234)
    first = [t.id for t in context.generate_stream("Tell me a story:", config=config)]
    second = [t.id for t in context.generate_stream("Tell me a story:", config=config)]
    third = [t.id for t in context.generate_stream("Tell me a story:", config=config.with_options(seed=99))]
    assert first == second
    assert first != third


def test_breaking_out_stops_decoding_within_one_token(context, model):
    prompt = "Generate a list:\n-"
    n_prompt = len(model.tokenize(prompt))
    stream = context.generate_stream(prompt, max_tokens=200, temperature=0)
    for i, _token in enumerate(stream):
        if i == 4:
            break
    # five tokens were sampled; the fifth was never decoded, nothing after it either
    assert len(context.cached_tokens) == n_prompt + 4
    stream.close()
    assert stream.finish_reason == "cancelled"
    assert stream.tokens_generated() == 5
    assert len(context.cached_tokens) == n_prompt + 4


def test_dropping_a_stream_stops_it_and_the_context_goes_on(context, model):
    stream = context.generate_stream("Once upon a time", max_tokens=100, temperature=0)
    next(stream)
    next(stream)
    cached = len(context.cached_tokens)
    del stream
    gc.collect()
    assert len(context.cached_tokens) == cached
    assert context.generate("Hello", max_tokens=4).token_ids


def test_a_new_generation_ends_the_previous_stream(context):
    old = context.generate_stream("Once upon a time", max_tokens=50, temperature=0)
    next(old)
    new = context.generate_stream("Hello there", max_tokens=5, temperature=0)
    list(new)
    with pytest.raises(mullama.ContextError):
        next(old)


def test_callback_streaming_and_early_stop(context):
    pieces = []
    stream = context.generate_streaming("Write a poem:", 200, lambda text: pieces.append(text) or len(pieces) < 7,
                                        temperature=0)
    assert len(pieces) == 7
    assert stream.tokens_generated() == 7
    assert stream.finish_reason == "cancelled"
    assert "".join(pieces) == stream.text
    with pytest.raises(mullama.InvalidConfigError):
        context.generate_streaming("x", 5, None)


def test_callback_exceptions_propagate_and_the_context_recovers(context):
    def explode(text):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        context.generate_streaming("Hello", 10, explode)
    assert context.generate("Hello", max_tokens=3).token_ids


def test_statistics(context):
    with context.generate_stream("Tell me about Rust:", max_tokens=32, temperature=0) as stream:
        assert stream.finish_reason is None
        tokens = list(stream)
    assert stream.tokens_generated() == len(tokens) > 1
    assert 0 < stream.time_to_first_token() < 5
    assert stream.tokens_per_second() > 1
    assert stream.prompt_seconds() is not None


def test_timeout_on_a_long_prompt_raises_stream_timeout_promptly(model):
    with mullama.Context(model, n_ctx=8192) as ctx:
        prompt = "A long prompt about many things. " * 900
        stream = ctx.generate_stream(prompt, max_tokens=4, timeout_ms=30)
        with pytest.raises(mullama.StreamingError) as info:
            list(stream)
        assert info.value.code == "STREAM_TIMEOUT"
        assert len(ctx.cached_tokens) < len(model.tokenize(prompt))  # stopped within the prompt
        assert stream.finish_reason == "error"
        assert ctx.generate("Hello", max_tokens=2).token_ids  # usable afterwards


def test_timeout_during_generation_comes_after_the_tokens(context):
    config = StreamConfig(max_tokens=10_000, temperature=0.8, seed=1, timeout_ms=300)
    received = []
    with pytest.raises(mullama.StreamingError) as info:
        for token in context.generate_stream("Count forever: 1, 2, 3,", config=config):
            received.append(token)
    assert info.value.code == "STREAM_TIMEOUT"
    assert len(received) > 2


def test_context_overflow_raised_before_decoding(model):
    with mullama.Context(model, n_ctx=256) as ctx:
        with pytest.raises(mullama.ContextOverflowError) as info:
            list(ctx.generate_stream("word " * 400, max_tokens=4))
        assert info.value.code == "CONTEXT_OVERFLOW"
        assert ctx.cached_tokens == []


def test_close_from_another_thread_ends_the_stream_after_the_token_being_made(context, monkeypatch):
    """A UI thread may cancel a stream another thread iterates: close() while that thread is inside a
    step asks it to stop, and the stream ends after the token that step hands out ("cancelled")."""
    from mullama.generate import _context

    errors: list[BaseException] = []
    streams: list[mullama.TokenStream] = []

    class ClosedDuringItsSecondStep(_context.Sequence):
        steps = 0

        def next_token(self, *args):
            type(self).steps += 1
            if self.steps == 2:  # inside the step: close() from another thread finds it executing
                closer = threading.Thread(target=lambda: _record(errors, streams[0].close))
                closer.start()
                closer.join()
            return super().next_token(*args)

    monkeypatch.setattr(_context, "Sequence", ClosedDuringItsSecondStep)
    stream = context.generate_stream("Count to fifty:", max_tokens=64, temperature=0, ignore_eos=True)
    streams.append(stream)
    next(stream)
    rest = list(stream)
    assert not errors
    assert len(rest) == 1 and stream.finish_reason == "cancelled" and stream.tokens_generated() == 2
    stream.close()  # from its own thread: the rest of the cleanup, once
    monkeypatch.undo()
    assert context.generate("Hello", max_tokens=4).token_ids


def test_close_from_another_thread_between_tokens_ends_the_stream(context):
    stream = context.generate_stream("Count to fifty:", max_tokens=64, temperature=0, ignore_eos=True)
    next(stream)
    closer = threading.Thread(target=stream.close)
    closer.start()
    closer.join()
    assert list(stream) == [] and stream.finish_reason == "cancelled"


def _record(errors: list[BaseException], call) -> None:
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - the test asserts there was none
        errors.append(error)
