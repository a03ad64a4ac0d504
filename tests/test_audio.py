"""Audio in through libmtmd: an audio projector written by tools/make_test_mmproj.py --audio for SmolLM2
(a Whisper encoder and Qwen2-Audio's linear projector, random and seeded), the pinned tree's
test-2.mp3, and greedy answers equal to upstream llama-server --mmproj's token for token: through the
Python API, AsyncModel, and `mullama serve`'s OpenAI route with the official client.

No package ships a small audio model with its projector, so the projector is random, as upstream's own
tests make theirs: the answers are nonsense, but they depend on the sound. Bad audio (cut short, a
format that is not read, a header that declares more than the file holds, random bytes, nothing) is a
MediaError in Python and a 4xx from the server, which goes on answering.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from pathlib import Path

import openai
import pytest
from mullama_server import MullamaServer
from test_vision import N_PREDICT, make_projector, projector_server, upstream_greedy

import mullama
from mullama import MediaError

QUESTION = "What do you hear?"
WINDOW_EMBEDDINGS = 750  # one 30-second window (test-2.mp3 is shorter: padded with silence)
MAX_AUDIO_SECONDS = 20  # the server's --max-audio-seconds: test-2.mp3 lasts 17.5 s


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory, model_path) -> Path:
    return make_projector(tmp_path_factory.mktemp("mmproj") / "audio-mmproj.gguf", model_path, "--audio")


@pytest.fixture(scope="module")
def clip(build) -> Path:
    """The pinned tree's test clip (an MP3 of a few seconds of speech)."""
    return Path(build.manifest["source"]) / "tools" / "mtmd" / "test-2.mp3"


@pytest.fixture(scope="module")
def audio_model(model_path, mmproj):
    model = mullama.Model.load(model_path, mmproj=mmproj)
    yield model
    model.close()


@pytest.fixture(scope="module")
def server(build, model_path, mmproj):
    """llama-server --mmproj on the same model and audio projector."""
    running = projector_server(build, model_path, mmproj)
    yield running
    running.close()


@pytest.fixture(scope="module")
def reference(server, audio_model, clip) -> dict:
    """llama-server's greedy answer about the clip: token ids from /completion, text and usage from its
    OpenAI chat route."""
    messages = audio_messages(encoded(clip.read_bytes()))
    chat = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": N_PREDICT, "temperature": 0,
                                                "cache_prompt": False})
    return {"completion": upstream_greedy(server, audio_model, messages, clip), "chat": chat}


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


def audio_messages(data: str, audio_format: object = "mp3", question: str = QUESTION) -> list[dict]:
    """OpenAI's shape: a question, then the clip as bare base64 in an input_audio part."""
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "input_audio", "input_audio": {"data": data,
                                                                                 "format": audio_format}}]}]


def tone_wav(seconds: float = 2.0, hertz: float = 440.0, rate: int = 16000) -> bytes:
    """A 16-bit mono PCM WAV of a sine tone."""
    samples = b"".join(struct.pack("<h", int(12000 * math.sin(2 * math.pi * hertz * i / rate)))
                       for i in range(int(seconds * rate)))
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(samples)) + samples)


def bad_audio(clip: Path) -> dict[str, bytes]:
    """Clips cut short or hostile: truncated MP3s, headers that declare more than the file holds (what
    the decoder would allocate), a compressed WAV, random bytes, an image sent as audio."""
    good = clip.read_bytes()
    blobs = {f"truncated-{cut}.mp3": good[:cut] for cut in (10, 100, 1000, len(good) // 2, len(good) - 7)}
    info = good.find(b"Info")  # LAME's Info header in the first frame: its frame count
    blobs["info-declares-2g-frames.mp3"] = good[:info + 8] + (0x7FFFFFFF).to_bytes(4, "big") + good[info + 12:]
    wav = tone_wav(0.5)
    blobs["truncated.wav"] = wav[:-100]
    blobs["data-chunk-declares-4gb.wav"] = wav[:40] + struct.pack("<I", 0xFFFFFFF0) + wav[44:]
    blobs["adpcm.wav"] = wav[:20] + struct.pack("<H", 2) + wav[22:]
    blobs["fact-declares-2g-samples.wav"] = (wav[:36] + b"fact" + struct.pack("<II", 4, 0x7FFFFFFF)
                                             + wav[36:])
    streaminfo = bytes(10) + ((16000 << 44) | (1 << 35)).to_bytes(8, "big") + bytes(16)
    blobs["streaminfo-declares-hours.flac"] = b"fLaC\x80\x00\x00\x22" + streaminfo
    blobs["no-samples.wav"] = wav[:40] + struct.pack("<I", 0) + b""
    blobs["random.mp3"] = bytes((i * 97 + 13) % 256 for i in range(5000))
    blobs["id3-then-junk.mp3"] = b"ID3\x04\0\0\0\0\0\x10" + bytes(16) + b"not audio at all" * 20
    blobs["image.jpg"] = (clip.parent / "test-1.jpeg").read_bytes()
    return blobs


def test_the_tool_writes_a_seeded_audio_projector(tmp_path, model_path, mmproj):
    again = make_projector(tmp_path / "again.gguf", model_path, "--audio")
    assert again.read_bytes() == mmproj.read_bytes()
    other = make_projector(tmp_path / "other.gguf", model_path, "--audio", "--seed", "1")
    assert other.read_bytes() != mmproj.read_bytes()


def test_a_model_loaded_with_an_audio_projector_takes_audio_only(audio_model, clip):
    assert audio_model.supports_audio and not audio_model.supports_vision
    context = mullama.Context(audio_model, n_ctx=4096)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(clip.parent / "test-1.jpeg")}},
                                          {"type": "text", "text": "?"}]}]
    with pytest.raises(MediaError) as caught:
        list(context.chat_stream(image, max_tokens=2))
    assert caught.value.code == "MEDIA_NOT_SUPPORTED" and "image" in str(caught.value)
    context.close()


def test_greedy_answer_about_a_clip_equals_llama_server(audio_model, reference, clip):
    completion = reference["completion"]
    context = mullama.Context(audio_model, n_ctx=4096)
    stream = context.chat_stream(audio_messages(encoded(clip.read_bytes())), max_tokens=N_PREDICT, temperature=0)
    tokens = list(stream)
    assert [token.id for token in tokens] == completion["tokens"]
    assert stream.prompt_tokens == completion["tokens_evaluated"]
    # One 30-second window's embeddings sit in the prompt, between the text tokens.
    assert sum(1 for token in context.cached_tokens if token < 0) == WINDOW_EMBEDDINGS
    assert "".join(token.text for token in tokens) == reference["chat"]["choices"][0]["message"]["content"]
    assert stream.prompt_tokens == reference["chat"]["usage"]["prompt_tokens"]
    context.close()


def test_async_model_answers_about_a_clip_beside_a_text_chat(model_path, mmproj, reference, clip):
    """AsyncModel's engine: the clip's chat and a text chat at once; the clip's answer is llama-server's."""
    messages = audio_messages(f"data:audio/mpeg;base64,{encoded(clip.read_bytes())}")

    async def together():
        async_model = await mullama.AsyncModel.load(model_path, mmproj=mmproj, parallel=2, n_ctx=4096)
        try:
            async def read(chat):
                stream = async_model.chat_stream(chat, max_tokens=N_PREDICT, temperature=0)
                return [token.id async for token in stream], stream.prompt_tokens

            return await asyncio.gather(read(messages), read([{"role": "user", "content": "Name a colour."}]))
        finally:
            await async_model.aclose()

    (tokens, prompt_tokens), (text_tokens, _) = asyncio.run(together())
    assert tokens == reference["completion"]["tokens"]
    assert prompt_tokens == reference["completion"]["tokens_evaluated"]
    assert text_tokens


def test_the_answer_depends_on_the_sound(audio_model, reference):
    context = mullama.Context(audio_model, n_ctx=4096)
    tone = [token.id for token in context.chat_stream(audio_messages(encoded(tone_wav()), "wav"),
                                                      max_tokens=N_PREDICT, temperature=0)]
    assert tone and tone != reference["completion"]["tokens"]
    context.close()


def test_bad_audio_gives_media_errors_and_the_context_goes_on(audio_model, clip):
    context = mullama.Context(audio_model, n_ctx=4096)
    too_long = {"fact-declares-2g-samples.wav", "streaminfo-declares-hours.flac"}  # beyond max_audio_seconds
    for name, data in bad_audio(clip).items():
        with pytest.raises(MediaError) as caught:
            list(context.chat_stream(audio_messages(encoded(data)), max_tokens=2, temperature=0))
        expected = "MEDIA_TOO_LARGE" if name in too_long else "INVALID_MEDIA"
        assert caught.value.code == expected, (name, str(caught.value))
    refusals = {"empty": audio_messages(""), "format ogg": audio_messages(encoded(clip.read_bytes()), "ogg"),
                "format 42": audio_messages(encoded(clip.read_bytes()), 42)}
    for name, messages in refusals.items():
        with pytest.raises(MediaError) as caught:
            list(context.chat_stream(messages, max_tokens=2, temperature=0))
        assert caught.value.code == "INVALID_MEDIA", (name, str(caught.value))
    with pytest.raises(MediaError, match="truncated"):
        list(context.chat_stream(audio_messages(encoded(clip.read_bytes()[:-7])), max_tokens=2))
    with pytest.raises(MediaError, match="wav, mp3, flac"):
        list(context.chat_stream(audio_messages(encoded(clip.read_bytes()), "ogg"), max_tokens=2))
    # The format field is a name, not a check of the bytes (as llama-server): any case of a known one.
    assert list(context.chat_stream(audio_messages(encoded(tone_wav(0.5)), "WAV"), max_tokens=2, temperature=0))
    context.close()


@pytest.fixture(scope="module")
def mullama_server(model_path, mmproj):
    running = MullamaServer(model_path, parallel=2, ctx_size=4096,
                            extra=("--mmproj", str(mmproj), "--max-audio-seconds", str(MAX_AUDIO_SECONDS)))
    yield running
    assert running.process.poll() is None, "the server died"
    running.close()


def test_the_openai_client_sends_input_audio_and_gets_llama_servers_answer(mullama_server, reference, clip):
    client = openai.OpenAI(base_url=f"{mullama_server.url}/v1", api_key="unused")
    answer = client.chat.completions.create(model="smollm2", messages=audio_messages(encoded(clip.read_bytes())),
                                            max_tokens=N_PREDICT, temperature=0)
    expected = reference["chat"]
    assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert answer.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert answer.usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_bad_audio_gives_4xx_and_the_server_goes_on(mullama_server, clip):
    cases = [audio_messages(encoded(data)) for data in bad_audio(clip).values()]
    cases += [audio_messages(""), audio_messages(encoded(clip.read_bytes()), "ogg")]
    for messages in cases:
        status, body = mullama_server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 2})
        assert status in (400, 413), (status, body)
        assert body["error"]["code"] in ("INVALID_MEDIA", "MEDIA_TOO_LARGE"), body
        assert body["error"]["message"]
    long_tone = audio_messages(encoded(tone_wav(MAX_AUDIO_SECONDS + 5)), "wav")
    status, body = mullama_server.post("/v1/chat/completions", {"messages": long_tone, "max_tokens": 2})
    assert (status, body["error"]["code"]) == (413, "MEDIA_TOO_LARGE"), body
    assert f"limit of {MAX_AUDIO_SECONDS} s" in body["error"]["message"]
    assert mullama_server.process.poll() is None
    status, body = mullama_server.post("/v1/chat/completions", {
        "messages": audio_messages(encoded(tone_wav(0.5)), "wav"), "max_tokens": 2, "temperature": 0})
    assert status == 200, body
