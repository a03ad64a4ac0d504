"""Images at M-RoPE positions (Qwen2-VL and kin): SmolLM2 rewritten as a ``qwen2vl`` model by
tools/make_mrope_model.py, a random Qwen2-VL projector by tools/make_test_mmproj.py --kind qwen2vl, the
pinned tree's test-1.jpeg (10 x 8 embeddings: 80 tokens that take 10 positions), and greedy answers equal
to upstream llama-server --mmproj's on the same files, token for token: through a Context, the batching
engine (beside a text request), the prompt cache, speculative decoding, and ``mullama serve``.

The text after an image sits at the position the image leaves (its first position plus max(nx, ny)),
not at its index in the prompt: a binding that decodes it at the index gives other tokens.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import upstream
from mullama_server import MullamaServer
from test_vision import (
    N_PREDICT,
    REPO,
    SERVER_MARKER,
    _bmp,
    assert_chat_endpoint_agrees,
    data_uri,
    image_messages,
    make_projector,
)

import mullama
from mullama import StateError
from mullama.chat._media_parts import split_media
from mullama.generate._context import default_threads

IMAGE_TOKENS, IMAGE_POSITIONS = 80, 10  # test-1.jpeg (640 x 488) in 32-pixel patches merged 2 x 2: 10 x 8


@pytest.fixture(scope="module")
def mrope_files(tmp_path_factory, model_path) -> tuple[Path, Path]:
    """The qwen2vl model and its projector."""
    directory = tmp_path_factory.mktemp("mrope")
    model = directory / "smollm2-qwen2vl.gguf"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_mrope_model.py"), str(model), "--for",
                    str(model_path)], check=True, capture_output=True, text=True, timeout=300)
    return model, make_projector(directory / "mmproj-qwen2vl.gguf", model, "--kind", "qwen2vl")


@pytest.fixture(scope="module")
def mrope_model(mrope_files):
    model = mullama.Model.load(mrope_files[0], mmproj=mrope_files[1])
    yield model
    model.close()


@pytest.fixture(scope="module")
def images(build, tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("images")
    grey = directory / "grey.bmp"
    grey.write_bytes(_bmp(96, 64, (128, 128, 128)))  # 2 x 1 embeddings after libmtmd's resize: 2 positions
    return {"test-1": Path(build.manifest["source"]) / "tools" / "mtmd" / "test-1.jpeg", "grey": grey}


@pytest.fixture(scope="module")
def server(build, mrope_files):
    """llama-server --mmproj on the same files (no warmup: Qwen2-VL's warmup image is 2944 pixels square)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAMA_MEDIA_MARKER", SERVER_MARKER)
    try:
        running = upstream.LlamaServer(build.tool("llama-server"), mrope_files[0], threads=default_threads(),
                                       n_ctx=4096, extra=("--mmproj", str(mrope_files[1]), "--no-warmup"))
    finally:
        mp.undo()
    yield running
    running.close()


def upstream_greedy(server, model, messages: list[dict], *images: Path, n_predict: int = N_PREDICT) -> dict:
    """llama-server's greedy answer for ``messages`` (the template rendered with its marker), token ids included."""
    marked, _sources = split_media(messages, SERVER_MARKER)
    prompt = model.apply_chat_template(marked, add_generation_prompt=True)
    return server.post("/completion", {
        "prompt": {"prompt_string": prompt, "multimodal_data": [base64.b64encode(image.read_bytes()).decode()
                                                                 for image in images]},
        "n_predict": n_predict, "temperature": 0.0, "top_k": 1, "samplers": ["top_k", "temperature"],
        "cache_prompt": False, "return_tokens": True})


def two_images(first: Path, second: Path) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Compare"},
                                         {"type": "image_url", "image_url": {"url": str(first)}},
                                         {"type": "text", "text": "with"},
                                         {"type": "image_url", "image_url": {"url": str(second)}},
                                         {"type": "text", "text": "in one sentence."}]}]


def test_the_rewritten_model_is_smollm2_at_m_rope_positions(mrope_model, mrope_files, model):
    """Honest: on text (every section at the same position) it answers as SmolLM2 does; its projector
    asks for M-RoPE."""
    assert mrope_model.projector.uses_mrope and mrope_model.supports_vision
    prompt = "The capital of France is"
    ours, original = mullama.Context(mrope_model, n_ctx=512), mullama.Context(model, n_ctx=512)
    assert ours.generate(prompt, 16, temperature=0).text == original.generate(prompt, 16, temperature=0).text
    ours.close()
    original.close()


def test_greedy_answer_about_an_image_equals_llama_server(mrope_model, server, images):
    image = images["test-1"]
    messages = image_messages(data_uri(image))
    reference = upstream_greedy(server, mrope_model, messages, image)
    context = mullama.Context(mrope_model, n_ctx=4096)
    stream = context.chat_stream(messages, max_tokens=N_PREDICT, temperature=0)
    assert [token.id for token in stream] == reference["tokens"]
    assert stream.prompt_tokens == reference["tokens_evaluated"]
    # 80 tokens that took 10 positions: the text after them sits 70 positions before its index.
    assert context._positions.shift == IMAGE_POSITIONS - IMAGE_TOKENS
    context.close()


def test_the_chat_endpoint_of_llama_server_gives_the_same_answer_and_usage(mrope_model, server, images):
    assert_chat_endpoint_agrees(mrope_model, server, image_messages(data_uri(images["test-1"])))


def test_two_images_with_text_between_them_equal_llama_server(mrope_model, server, images):
    """The shifts add up: text between two images, and after both, at llama-server's positions."""
    messages = two_images(images["test-1"], images["grey"])
    reference = upstream_greedy(server, mrope_model, messages, images["test-1"], images["grey"])
    context = mullama.Context(mrope_model, n_ctx=4096)
    stream = context.chat_stream(messages, max_tokens=N_PREDICT, temperature=0)
    assert [token.id for token in stream] == reference["tokens"]
    assert stream.prompt_tokens == reference["tokens_evaluated"]
    assert context._positions.shift < IMAGE_POSITIONS - IMAGE_TOKENS  # both images' shifts
    context.close()


def test_the_prompt_cache_reuses_an_image_only_when_it_is_the_same(mrope_model, server, images):
    """The same image again reuses its cells; a follow-up turn decodes only what is new, after the image
    (the cut lands at a position, not an index); another image is decoded again. Every answer is
    llama-server's without a cache."""
    context = mullama.Context(mrope_model, n_ctx=4096)
    first = image_messages(str(images["test-1"]))
    reference = upstream_greedy(server, mrope_model, first, images["test-1"])
    again = None
    for _ in range(2):
        again = context.chat_stream(first, max_tokens=N_PREDICT, temperature=0)
        assert [t.id for t in again] == reference["tokens"]
    assert again is not None and again.cached_tokens == again.prompt_tokens - 1
    follow_up = [*first, {"role": "assistant", "content": again.text}, {"role": "user", "content": "Say it again."}]
    expected = upstream_greedy(server, mrope_model, follow_up, images["test-1"])
    stream = context.chat_stream(follow_up, max_tokens=N_PREDICT, temperature=0)
    assert [t.id for t in stream] == expected["tokens"]
    image_end = max(i for i, token in enumerate(context.cached_tokens) if token < 0) + 1
    assert image_end < stream.cached_tokens < stream.prompt_tokens  # the image and text after it reused
    other = image_messages(str(images["grey"]))
    stream = context.chat_stream(other, max_tokens=N_PREDICT, temperature=0)
    assert [t.id for t in stream] == upstream_greedy(server, mrope_model, other, images["grey"])["tokens"]
    image_start = next(i for i, token in enumerate(context.cached_tokens) if token < 0)
    assert stream.cached_tokens == image_start  # the text before the image only
    # ... and back to the first image: its cells were dropped with the cut, so all is decoded again.
    stream = context.chat_stream(first, max_tokens=N_PREDICT, temperature=0)
    assert [t.id for t in stream] == reference["tokens"] and stream.cached_tokens == image_start
    context.close()


def test_speculative_decoding_after_an_image_gives_the_same_tokens(mrope_model, server, images):
    """Drafts verified at the shifted positions, rejected cells dropped from there (the answer repeats
    itself: n-gram drafts are accepted)."""
    messages = image_messages(str(images["test-1"]))
    reference = upstream_greedy(server, mrope_model, messages, images["test-1"], n_predict=48)
    context = mullama.Context(mrope_model, n_ctx=4096)
    stream = context.chat_stream(messages, max_tokens=48, temperature=0, speculative="ngram-simple", draft_min=2)
    assert [t.id for t in stream] == reference["tokens"]
    assert stream.draft_accepted > 0
    context.close()


def test_a_state_past_an_m_rope_image_is_not_saved(mrope_model, images, tmp_path):
    """A state file records tokens, not where they sit: refused, and the context goes on."""
    context = mullama.Context(mrope_model, n_ctx=4096)
    list(context.chat_stream(image_messages(str(images["test-1"])), max_tokens=2, temperature=0))
    with pytest.raises(StateError, match="M-RoPE"):
        context.save_state(tmp_path / "state.bin")
    context.clear()
    list(context.chat_stream([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0))
    assert context.save_state(tmp_path / "state.bin") > 0
    context.close()


def test_image_requests_batch_with_text_ones_in_the_engine(mrope_files, mrope_model, server, images):
    """AsyncModel: two image chats (one of two images) and two text chats at once in one engine, each
    answer llama-server's; then the same image again reuses the slot's cells, and a follow-up turn is
    decoded after them."""
    model = mullama.Model.load(mrope_files[0], mmproj=mrope_files[1])
    chats = [image_messages(data_uri(images["test-1"])), [{"role": "user", "content": "Name a colour."}],
             two_images(images["grey"], images["test-1"]), [{"role": "user", "content": "Count to five."}]]
    references = [upstream_greedy(server, mrope_model, chats[0], images["test-1"])["tokens"],
                  server.greedy(mrope_model.apply_chat_template(chats[1]), N_PREDICT)["tokens"],
                  upstream_greedy(server, mrope_model, chats[2], images["grey"], images["test-1"])["tokens"],
                  server.greedy(mrope_model.apply_chat_template(chats[3]), N_PREDICT)["tokens"]]

    async def together():
        async_model = mullama.AsyncModel(model, parallel=4, n_ctx=2048)  # the model stays ours: closed below
        try:
            streams = [async_model.chat_stream(messages, max_tokens=N_PREDICT, temperature=0) for messages in chats]

            async def read(stream):
                return [token.id async for token in stream]

            answers = await asyncio.gather(*(read(stream) for stream in streams))
            again = async_model.chat_stream(chats[0], max_tokens=N_PREDICT, temperature=0)
            repeated = await read(again)
            follow_up = [*chats[0], {"role": "assistant", "content": again.text}, {"role": "user", "content": "Again."}]
            turn = async_model.chat_stream(follow_up, max_tokens=N_PREDICT, temperature=0)
            return answers, repeated, again, await read(turn), turn, follow_up
        finally:
            await async_model.aclose()
            model.close()

    answers, repeated, again, turn_tokens, turn, follow_up = asyncio.run(together())
    assert answers == references
    assert repeated == references[0] and again.cached_tokens == again.prompt_tokens - 1
    assert turn_tokens == upstream_greedy(server, mrope_model, follow_up, images["test-1"])["tokens"]
    assert again.prompt_tokens <= turn.cached_tokens < turn.prompt_tokens


def test_the_openai_client_gets_llama_servers_answer_from_mullama_serve(mrope_files, server, images):
    messages = image_messages(data_uri(images["test-1"]))
    expected = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": N_PREDICT, "temperature": 0,
                                                    "cache_prompt": False})
    running = MullamaServer(mrope_files[0], parallel=2, ctx_size=4096, extra=("--mmproj", str(mrope_files[1])))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused")
        for _ in range(2):  # the second time from the slot's cache
            answer = client.chat.completions.create(model="qwen2vl", messages=messages, max_tokens=N_PREDICT,
                                                    temperature=0)
            assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
            assert answer.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
            assert answer.usage.completion_tokens == expected["usage"]["completion_tokens"]
        assert answer.usage.prompt_tokens_details.cached_tokens == answer.usage.prompt_tokens - 1
    finally:
        assert running.process.poll() is None, "the server died"
        running.close()


def test_a_cut_never_lands_inside_an_m_rope_image():
    """CachePositions alone: where each cut drops cells from, and a cut inside an image going back to its start
    (its cells all sit at its first position: a cut inside would keep them all)."""
    from mullama.generate._positions import CachePositions

    positions = CachePositions()
    positions.add(5, 85, IMAGE_POSITIONS)  # text 0-4, an image 5-84 (positions 5-14), text from 85 at 15
    positions.add(90, 92, 2)  # an ordinary chunk: no shift
    assert positions and positions.shift == -70
    assert positions.cut(100) == (100, 30)  # nothing past the end: the position after it
    assert positions.cut(86) == (86, 16) and positions.shift == -70
    assert positions.cut(40) == (5, 5) and not positions and positions.shift == 0
