"""Images in through libmtmd: a projector written by tools/make_test_mmproj.py for SmolLM2, the pinned
tree's test-1.jpeg, and greedy answers equal to upstream llama-server --mmproj's token for token.

No package ships a small vision model with its projector, so the projector is random (seeded), as
upstream's own tests make theirs: the answers are nonsense, but they depend on the image, and every
token of them is compared with llama-server's on the same files.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from pathlib import Path

import pytest
import upstream

import mullama
from mullama import MediaError
from mullama.chat._media_parts import split_media
from mullama.generate._context import default_threads

REPO = Path(__file__).resolve().parent.parent
N_PREDICT = 24
QUESTION = "What is in this image?"
SERVER_MARKER = "<__test_media__>"  # llama-server's marker, pinned (LLAMA_MEDIA_MARKER) for /completion prompts


def make_projector(out: Path, model_path: Path, *options: str) -> Path:
    subprocess.run([sys.executable, str(REPO / "tools" / "make_test_mmproj.py"), str(out), "--for", str(model_path),
                    *options], check=True, capture_output=True, text=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory, model_path) -> Path:
    return make_projector(tmp_path_factory.mktemp("mmproj") / "mmproj.gguf", model_path)


@pytest.fixture(scope="module")
def images(build) -> dict[str, Path]:
    """The pinned tree's test image."""
    tree = Path(build.manifest["source"]) / "tools" / "mtmd"
    return {"test-1": tree / "test-1.jpeg"}


@pytest.fixture(scope="module")
def vision_model(model_path, mmproj):
    model = mullama.Model.load(model_path, mmproj=mmproj)
    yield model
    model.close()


@pytest.fixture(scope="module")
def server(build, model_path, mmproj):
    running = projector_server(build, model_path, mmproj)
    yield running
    running.close()


def projector_server(build, model_path: Path, mmproj: Path, *extra: str) -> upstream.LlamaServer:
    """llama-server --mmproj on the same model and projector (its media marker pinned), with ``extra`` options."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAMA_MEDIA_MARKER", SERVER_MARKER)
    try:
        return upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(),
                                    n_ctx=4096, extra=("--mmproj", str(mmproj), *extra))
    finally:
        mp.undo()


def data_uri(path: Path, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def image_messages(url: str, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def upstream_greedy(server, model, messages: list[dict], image: Path) -> dict:
    """llama-server's greedy answer for ``messages``: the chat template rendered with its marker where
    the image goes, sent to /completion with the image (token ids come back)."""
    marked, _sources = split_media(messages, SERVER_MARKER)
    prompt = model.apply_chat_template(marked, add_generation_prompt=True)
    return server.post("/completion", {
        "prompt": {"prompt_string": prompt, "multimodal_data": [base64.b64encode(image.read_bytes()).decode()]},
        "n_predict": N_PREDICT, "temperature": 0.0, "top_k": 1, "samplers": ["top_k", "temperature"],
        "cache_prompt": False, "return_tokens": True})


def test_the_tool_writes_a_seeded_projector_for_the_model(tmp_path, model_path, mmproj):
    again = make_projector(tmp_path / "again.gguf", model_path)
    other = make_projector(tmp_path / "other.gguf", model_path, "--seed", "1")
    assert again.read_bytes() == mmproj.read_bytes()
    assert other.read_bytes() != mmproj.read_bytes()


def test_a_model_loaded_with_a_projector_takes_images(vision_model, model):
    assert vision_model.supports_vision and not vision_model.supports_audio
    assert not model.supports_vision and not model.supports_audio


def test_greedy_answer_about_an_image_equals_llama_server(vision_model, server, images):
    image = images["test-1"]
    messages = image_messages(data_uri(image))
    reference = upstream_greedy(server, vision_model, messages, image)
    context = mullama.Context(vision_model, n_ctx=4096)
    stream = context.chat_stream(messages, max_tokens=N_PREDICT, temperature=0)
    tokens = [token.id for token in stream]
    assert tokens == reference["tokens"]
    assert stream.prompt_tokens == reference["tokens_evaluated"]
    # The image's 16 embeddings sit in the prompt: more positions than its text alone.
    text_only = vision_model.tokenize(vision_model.apply_chat_template(split_media(messages, "")[0]),
                                      parse_special=True)
    assert stream.prompt_tokens == len(text_only) + 16
    context.close()


def test_the_chat_endpoint_of_llama_server_gives_the_same_answer_and_usage(vision_model, server, images):
    assert_chat_endpoint_agrees(vision_model, server, image_messages(data_uri(images["test-1"])))


def assert_chat_endpoint_agrees(model, server, messages: list[dict]) -> None:
    """llama-server's /v1/chat/completions answers ``messages`` with our text and prompt token count."""
    answer = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": N_PREDICT,
                                                  "temperature": 0, "cache_prompt": False})
    with mullama.Context(model, n_ctx=4096) as context:
        stream = context.chat_stream(messages, max_tokens=N_PREDICT, temperature=0)
        assert "".join(token.text for token in stream) == answer["choices"][0]["message"]["content"]
        assert stream.prompt_tokens == answer["usage"]["prompt_tokens"]


def test_the_answer_depends_on_the_image(vision_model, images, tmp_path):
    flipped = tmp_path / "grey.bmp"
    flipped.write_bytes(_bmp(32, 32, (128, 128, 128)))
    context = mullama.Context(vision_model, n_ctx=4096)
    first = [t.id for t in context.chat_stream(image_messages(str(images["test-1"])), max_tokens=12, temperature=0)]
    second = [t.id for t in context.chat_stream(image_messages(str(flipped)), max_tokens=12, temperature=0)]
    assert first != second
    context.close()


def test_a_file_path_and_a_data_uri_give_the_same_tokens(vision_model, images):
    context = mullama.Context(vision_model, n_ctx=4096)
    image = images["test-1"]
    by_uri = [t.id for t in context.chat_stream(image_messages(data_uri(image)), max_tokens=12, temperature=0)]
    by_path = [t.id for t in context.chat_stream(image_messages(str(image)), max_tokens=12, temperature=0,
                                                 cache_prompt=False)]
    by_url = [t.id for t in context.chat_stream(image_messages(image.as_uri()), max_tokens=12, temperature=0,
                                                cache_prompt=False)]
    assert by_uri == by_path == by_url
    context.close()


def test_the_prompt_cache_reuses_an_image_only_when_it_is_the_same(vision_model, images, tmp_path):
    grey = tmp_path / "grey.bmp"
    grey.write_bytes(_bmp(32, 32, (128, 128, 128)))
    context = mullama.Context(vision_model, n_ctx=4096)
    first = context.chat_stream(image_messages(str(images["test-1"])), max_tokens=4, temperature=0)
    reference = [t.id for t in first]
    again = context.chat_stream(image_messages(str(images["test-1"])), max_tokens=4, temperature=0)
    assert [t.id for t in again] == reference
    assert again.cached_tokens == again.prompt_tokens - 1  # all but the last token, image included
    other = context.chat_stream(image_messages(str(grey)), max_tokens=4, temperature=0)
    list(other)
    image_start = next(i for i, token in enumerate(context.cached_tokens) if token < 0)
    assert other.cached_tokens == image_start  # the text before the image only
    # A fresh context with the other image gives what the cache-reusing one gave.
    fresh = mullama.Context(vision_model, n_ctx=4096)
    alone = fresh.chat_stream(image_messages(str(grey)), max_tokens=4, temperature=0)
    assert [t.id for t in alone] == other.token_ids
    fresh.close()
    context.close()


def test_image_requests_batch_with_text_ones_in_the_engine(vision_model, server, images, tmp_path, model_path, mmproj):
    """AsyncModel: two image chats and two text chats at once, in one engine; each answer equals the
    one a Context gives alone (and the image one equals llama-server's)."""
    grey = tmp_path / "grey.bmp"
    grey.write_bytes(_bmp(32, 32, (128, 128, 128)))
    chats = [image_messages(data_uri(images["test-1"])), [{"role": "user", "content": "Name a colour."}],
             image_messages(str(grey)), [{"role": "user", "content": "Count to five."}]]
    alone = []
    for messages in chats:
        context = mullama.Context(vision_model, n_ctx=1024)
        alone.append([t.id for t in context.chat_stream(messages, max_tokens=N_PREDICT, temperature=0)])
        context.close()
    reference = upstream_greedy(server, vision_model, chats[0], images["test-1"])
    assert alone[0] == reference["tokens"]

    async def together():
        # Its own model (load() loaded it): aclose() closes it.
        async_model = await mullama.AsyncModel.load(model_path, mmproj=mmproj, parallel=4, n_ctx=4096)
        try:
            streams = [async_model.chat_stream(messages, max_tokens=N_PREDICT, temperature=0) for messages in chats]

            async def read(stream):
                return [token.id async for token in stream]

            answers = await asyncio.gather(*(read(stream) for stream in streams))
            stats = dict(async_model._get_engine().stats)
            again = async_model.chat_stream(chats[0], max_tokens=4, temperature=0)
            first = [token.id async for token in again]
            return answers, stats, first, again.cached_tokens, again.prompt_tokens
        finally:
            await async_model.aclose()

    answers, stats, first, cached, prompt = asyncio.run(together())
    assert answers == alone
    assert stats["requests_finished"] == 4
    assert first == alone[0][:4]
    assert cached == prompt - 1  # the same image again: its cells (and the text around it) reused


def test_media_errors_are_clear(vision_model, model, images, tmp_path):
    context = mullama.Context(vision_model, n_ctx=4096)
    cases = {
        "REMOTE_MEDIA_REFUSED": image_messages("https://example.com/cat.jpg"),
        "INVALID_MEDIA": image_messages("data:image/png;base64,not base64!"),
        "MEDIA_NOT_SUPPORTED": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}],
    }
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + (100_000).to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0")
    cases["MEDIA_TOO_LARGE"] = image_messages(str(huge))
    for code, messages in cases.items():
        with pytest.raises(MediaError) as caught:
            list(context.chat_stream(messages, max_tokens=2, temperature=0))
        assert caught.value.code == code, (code, str(caught.value))
    with pytest.raises(MediaError) as caught:
        list(context.chat_stream(image_messages(str(tmp_path / "missing.jpg")), max_tokens=2))
    assert "cannot read" in str(caught.value)
    text_context = mullama.Context(model)
    with pytest.raises(MediaError) as caught:
        text_context.chat_stream(image_messages(str(images["test-1"])), max_tokens=2)
    assert caught.value.code == "MEDIA_NOT_SUPPORTED" and "mmproj" in str(caught.value)
    text_context.close()
    # The context goes on answering after every refusal.
    assert list(context.chat_stream(image_messages(str(images["test-1"])), max_tokens=2, temperature=0))
    context.close()


def malformed_corpus(image: Path, directory: Path) -> list[Path]:
    """At least 50 malformed or hostile files: truncations of a real JPEG, image and audio formats' magic
    bytes with garbage after them, headers that declare huge (or zero) dimensions, text, an empty file."""
    good = image.read_bytes()
    blobs: dict[str, bytes] = {}
    for cut in (1, 2, 3, 10, 100, 300, 1000, 3000, len(good) // 4, len(good) // 2, len(good) - 10):
        blobs[f"truncated-{cut}.jpg"] = good[:cut]
    magics = ((b"\x89PNG\r\n\x1a\n", "png"), (b"GIF89a", "gif"), (b"BM", "bmp"), (b"\xff\xd8\xff", "jpg"),
              (b"RIFF\0\0\0\0WAVE", "wav"), (b"ID3", "mp3"), (b"fLaC", "flac"), (b"RIFF\0\0\0\0WEBP", "webp"))
    for magic, name in magics:
        for size in (0, 7, 64, 4096):
            blobs[f"magic-{name}-{size}.{name}"] = magic + bytes((i * 37) % 256 for i in range(size))
    for width, height in ((1 << 16, 1 << 16), (1 << 30, 1), (0, 0), (1, 1 << 30)):
        header = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        blobs[f"png-{width}x{height}.png"] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + header + b"\x08\x02\0\0\0"
        blobs[f"gif-{width % 65536}x{height % 65536}.gif"] = (b"GIF89a" + (width % 65536).to_bytes(2, "little")
                                                               + (height % 65536).to_bytes(2, "little") + b"\0\0\0")
    blobs["text.jpg"] = b"this is not an image\n" * 10
    blobs["empty.jpg"] = b""
    paths = []
    for name, data in blobs.items():
        path = directory / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_a_corpus_of_malformed_images_gives_media_errors_never_a_crash(vision_model, images, tmp_path):
    corpus = malformed_corpus(images["test-1"], tmp_path)
    assert len(corpus) >= 50
    context = mullama.Context(vision_model, n_ctx=4096)
    for path in corpus:
        for url in (str(path), data_uri(path, "image/png")):
            with pytest.raises(MediaError) as caught:
                list(context.chat_stream(image_messages(url), max_tokens=2, temperature=0))
            assert caught.value.code in ("INVALID_MEDIA", "MEDIA_TOO_LARGE"), (path.name, str(caught.value))
    assert list(context.chat_stream(image_messages(str(images["test-1"])), max_tokens=2, temperature=0))
    context.close()


def _bmp(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    """An uncompressed 24-bit BMP of one colour."""
    row = bytes(reversed(colour)) * width
    row += bytes((4 - len(row) % 4) % 4)
    pixels = row * height
    header = (b"BM" + (54 + len(pixels)).to_bytes(4, "little") + bytes(4) + (54).to_bytes(4, "little")
              + (40).to_bytes(4, "little") + width.to_bytes(4, "little") + height.to_bytes(4, "little")
              + (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + bytes(4) + len(pixels).to_bytes(4, "little")
              + bytes(16))
    return header + pixels


def test_mullama_run_with_an_image_prints_the_greedy_answer(vision_model, model_path, mmproj, images):
    context = mullama.Context(vision_model, n_ctx=4096)
    expected = "".join(t.text for t in context.chat_stream(image_messages(str(images["test-1"])), max_tokens=12,
                                                           temperature=0))
    context.close()
    done = subprocess.run([sys.executable, "-m", "mullama", "run", "-m", str(model_path), "--mmproj", str(mmproj),
                           "--image", str(images["test-1"]), "--temp", "0", "-n", "12", "--json", QUESTION],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    import json

    result = json.loads(done.stdout)
    assert result["text"] == expected
    assert result["prompt_tokens"] > 16
    refused = subprocess.run([sys.executable, "-m", "mullama", "run", "-m", str(model_path), "--image",
                              str(images["test-1"]), QUESTION], capture_output=True, text=True, timeout=300,
                             stdin=subprocess.DEVNULL)
    assert refused.returncode != 0 and "--mmproj" in refused.stderr


def test_the_terminal_chat_attaches_an_image_with_slash_image(vision_model, model_path, mmproj, images):
    import pexpect

    context = mullama.Context(vision_model, n_ctx=4096)
    expected = "".join(t.text for t in context.chat_stream(image_messages(str(images["test-1"])), max_tokens=8,
                                                           temperature=0))
    context.close()
    child = pexpect.spawn(sys.executable, ["-m", "mullama", "chat", "-m", str(model_path), "--mmproj", str(mmproj),
                                           "--temp", "0", "-n", "8"], encoding="utf-8", timeout=300,
                          dimensions=(40, 200))
    child.expect(">>> ")
    child.sendline(f"/image {images['test-1']}")
    child.expect("will go with your next message")
    child.expect(">>> ")
    child.sendline(QUESTION)
    child.expect(r"prompt tokens cached")
    transcript = child.before
    child.expect(">>> ")
    child.sendline("/image /nonexistent.jpg")
    child.expect("usage: /image FILE")
    child.expect(">>> ")  # reading again: a Ctrl-D sent before readline is set up can be lost
    child.sendeof()
    child.expect(pexpect.EOF)
    words = [word for word in expected.split() if word.isalpha()][:3]
    assert words and all(word in transcript for word in words), (expected, transcript)


PASSAGE = ("The lighthouse keeper wrote in his log every evening: the wind, the ships that passed, the oil "
           "burned, and the state of the lamp. In forty years the light failed twice.")


def test_ngram_drafts_over_an_image_prompt_search_its_text_as_llama_servers(vision_model, build, model_path, mmproj,
                                                                            images):
    """A passage, then an image, and the answer repeats the passage: the n-gram drafts search the
    prompt's text with the image's positions left out (llama-server's get_text_tokens), so at the end
    of the passage a draft copies the text that followed it past the image, never an image position.
    Tokens and draft counts equal llama-server --mmproj --spec-type ngram-simple's."""
    spec = {"speculative": "ngram-simple", "draft_min": 4, "draft_max": 16}
    reference_server = projector_server(build, model_path, mmproj, "--spec-type", "ngram-simple",
                                        "--spec-ngram-simple-size-n", "4", "--spec-ngram-simple-size-m", "16")
    messages = [{"role": "user", "content": [
        {"type": "text", "text": f"Repeat this text exactly: {PASSAGE}"},
        {"type": "image_url", "image_url": {"url": str(images["test-1"])}}, {"type": "text", "text": "Repeat it."}]}]
    try:
        marked, _sources = split_media(messages, SERVER_MARKER)
        prompt = vision_model.apply_chat_template(marked, add_generation_prompt=True)
        reference = reference_server.post("/completion", {
            "prompt": {"prompt_string": prompt,
                       "multimodal_data": [base64.b64encode(images["test-1"].read_bytes()).decode()]},
            "n_predict": 64, "temperature": 0.0, "top_k": 1, "samplers": ["top_k", "temperature"],
            "cache_prompt": False, "return_tokens": True})
    finally:
        reference_server.close()
    context = mullama.Context(vision_model, n_ctx=4096)
    try:
        plain = context.chat_stream(messages, max_tokens=64, temperature=0, cache_prompt=False)
        plain_ids = [token.id for token in plain]
        drafted = context.chat_stream(messages, max_tokens=64, temperature=0, cache_prompt=False, **spec)
        drafted_ids = [token.id for token in drafted]
    finally:
        context.close()
    assert drafted_ids == plain_ids == reference["tokens"]
    assert drafted.draft_accepted > 0
    assert (drafted.draft_proposed, drafted.draft_accepted) == (
        reference["timings"].get("draft_n", 0), reference["timings"].get("draft_n_accepted", 0))


def test_a_draft_model_leaves_image_prompts_to_the_target(vision_model, draft_model, images):
    """Its drafts would need the projector's embeddings at the image's positions: an image prompt is
    decoded without them (the same tokens, nothing drafted) in a Context and in the engine, and text
    prompts still draft."""
    messages = image_messages(str(images["test-1"]))
    options = {"max_tokens": N_PREDICT, "temperature": 0, "cache_prompt": False}
    with mullama.Context(vision_model, n_ctx=4096) as context:
        plain = [token.id for token in context.chat_stream(messages, **options)]
    with mullama.Context(vision_model, n_ctx=4096, draft_model=draft_model) as context:
        stream = context.chat_stream(messages, speculative="draft", **options)
        assert [token.id for token in stream] == plain
        assert stream.draft_proposed == 0
        text = context.chat_stream([{"role": "user", "content": "Count from one to twenty."}], speculative="draft",
                                   **options)
        assert list(text) and text.draft_proposed > 0

    async def in_the_engine() -> tuple[list[int], int]:
        engine = mullama.AsyncModel(vision_model, parallel=2, n_ctx=4096, draft_model=draft_model)
        try:
            stream = engine.chat_stream(messages, speculative="draft", **options)
            ids = [token.id async for token in stream]
            return ids, stream.draft_proposed
        finally:
            engine_object = engine.engine
            if engine_object is not None:
                await asyncio.to_thread(engine_object.close)

    ids, proposed = asyncio.run(in_the_engine())
    assert ids == plain and proposed == 0


def test_prompt_logprobs_are_refused_for_a_prompt_with_an_image(vision_model, images):
    context = mullama.Context(vision_model, n_ctx=4096)
    try:
        with pytest.raises(mullama.InvalidConfigError) as refused:
            context.chat_stream(image_messages(data_uri(images["test-1"])), max_tokens=2, prompt_logprobs=1)
        assert refused.value.field == "prompt_logprobs" and "holds images or audio" in str(refused.value)
    finally:
        context.close()
