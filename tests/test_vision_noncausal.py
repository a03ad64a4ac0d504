"""Images decoded with non-causal attention (Gemma 3's projector, ``mtmd_decode_use_non_causal``): the
image's embeddings attend to each other both ways, and causal attention is back for the text after
them. Gemma 3 270M (the second test model) with a random Gemma 3 projector from
tools/make_test_mmproj.py --kind gemma3, the pinned tree's test-1.jpeg (16 embeddings), and greedy
answers equal to llama-server --mmproj's token for token: Context, the engine beside a text request,
the prompt cache and ``mullama serve``. The base model has no chat template: both sides use the pinned
tree's Gemma one. (Decoded with causal attention, the same embeddings give other tokens.)
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import openai
import pytest
import upstream
from mullama_server import MullamaServer
from test_vision import SERVER_MARKER, _bmp, data_uri, image_messages, make_projector

import mullama
from mullama.chat._media_parts import split_media
from mullama.generate._context import default_threads
from mullama.hub import _pull

N_PREDICT = 16
IMAGE_TOKENS = 16  # 64-pixel square, 8-pixel patches, pooled 2 x 2


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    return _pull.resolve("gemma3:270m")


@pytest.fixture(scope="module")
def template(build) -> Path:
    return upstream.template_path(build, "google-gemma-2-2b-it.jinja")


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory, gemma_path) -> Path:
    return make_projector(tmp_path_factory.mktemp("gemma3") / "mmproj-gemma3.gguf", gemma_path, "--kind", "gemma3")


@pytest.fixture(scope="module")
def gemma(gemma_path, mmproj):
    model = mullama.Model.load(gemma_path, mmproj=mmproj)
    yield model
    model.close()


@pytest.fixture(scope="module")
def images(build, tmp_path_factory) -> dict[str, Path]:
    grey = tmp_path_factory.mktemp("images") / "grey.bmp"
    grey.write_bytes(_bmp(32, 32, (128, 128, 128)))
    return {"test-1": Path(build.manifest["source"]) / "tools" / "mtmd" / "test-1.jpeg", "grey": grey}


@pytest.fixture(scope="module")
def server(build, gemma_path, mmproj, template):
    mp = pytest.MonkeyPatch()
    mp.setenv("LLAMA_MEDIA_MARKER", SERVER_MARKER)
    try:
        extra = ("--mmproj", str(mmproj), "--jinja", "--chat-template-file", str(template))
        running = upstream.LlamaServer(build.tool("llama-server"), gemma_path, threads=default_threads(), n_ctx=4096,
                                       extra=extra)
    finally:
        mp.undo()
    yield running
    running.close()


def upstream_greedy(server, model, template: Path, messages: list[dict], image: Path | None = None) -> dict:
    """llama-server's greedy answer without its cache (token ids and the prompt's token count)."""
    marked, _sources = split_media(messages, SERVER_MARKER)
    prompt = model.apply_chat_template(marked, add_generation_prompt=True, template=template.read_text())
    media = [base64.b64encode(image.read_bytes()).decode()] if image is not None else []
    return server.post("/completion", {
        "prompt": {"prompt_string": prompt, "multimodal_data": media}, "n_predict": N_PREDICT, "temperature": 0.0,
        "top_k": 1, "samplers": ["top_k", "temperature"], "cache_prompt": False, "return_tokens": True})


def test_the_projector_asks_for_non_causal_attention(gemma):
    mtmd = gemma.projector._mtmd
    assert mtmd.lib.mtmd_decode_use_non_causal(gemma.projector.ptr, mtmd.ffi.NULL)
    assert not gemma.projector.uses_mrope


def test_greedy_answer_about_an_image_equals_llama_server(gemma, server, template, images):
    messages = image_messages(data_uri(images["test-1"]), "Describe the picture in one sentence:")
    reference = upstream_greedy(server, gemma, template, messages, images["test-1"])
    chat = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": N_PREDICT, "temperature": 0,
                                                "cache_prompt": False})
    context = mullama.Context(gemma, n_ctx=2048)
    stream = context.chat_stream(messages, max_tokens=N_PREDICT, temperature=0, chat_template=template)
    assert [token.id for token in stream] == reference["tokens"]
    assert stream.prompt_tokens == reference["tokens_evaluated"] == chat["usage"]["prompt_tokens"]
    assert stream.text == chat["choices"][0]["message"]["content"]
    # Attention is causal again after the image: a text-only chat on the same llama context answers as
    # llama-server does (its cache not reused: on this sliding-window model a reused prefix may change
    # the last digits, and llama-server rolls back to a checkpoint instead; text prompts alike).
    text = [{"role": "user", "content": "Name a colour."}]
    stream = context.chat_stream(text, max_tokens=N_PREDICT, temperature=0, chat_template=template,
                                 cache_prompt=False)
    assert [token.id for token in stream] == upstream_greedy(server, gemma, template, text)["tokens"]
    context.close()


def test_the_prompt_cache_keeps_the_text_before_another_image(gemma, server, template, images):
    """Another image: only the text before it is reused, the answer is llama-server's. The same image
    again: all but the last token reused (its answer is not compared: llama-server rolls a sliding-window
    model back to a checkpoint 4 tokens before the end and decodes 5 again; mullama decodes 1, and the
    last digits may differ, as they may for a text prompt)."""
    context = mullama.Context(gemma, n_ctx=2048)
    first = image_messages(str(images["test-1"]))
    list(context.chat_stream(first, max_tokens=N_PREDICT, temperature=0, chat_template=template))
    other = image_messages(str(images["grey"]))
    stream = context.chat_stream(other, max_tokens=N_PREDICT, temperature=0, chat_template=template)
    assert [t.id for t in stream] == upstream_greedy(server, gemma, template, other, images["grey"])["tokens"]
    image_start = next(i for i, token in enumerate(context.cached_tokens) if token < 0)
    assert stream.cached_tokens == image_start
    again = context.chat_stream(other, max_tokens=N_PREDICT, temperature=0, chat_template=template)
    list(again)
    assert again.cached_tokens == again.prompt_tokens - 1
    context.close()


def test_image_requests_in_the_engine_equal_llama_server_and_leave_attention_causal(gemma_path, gemma, mmproj, server,
                                                                                   template, images):
    """AsyncModel: each image request decoded in the engine's shared context answers as llama-server does;
    then, after image and text requests ran together, a text request answers as llama-server does (the
    context's attention is causal again). Answers of requests that ran together are not compared: on
    Gemma 3 the rounding of a batch depends on what else it holds (text requests alike), and
    llama-server's reference decodes alone."""
    chats = [image_messages(data_uri(images["test-1"]), "Describe the picture in one sentence:"),
             image_messages(str(images["grey"])), [{"role": "user", "content": "Count to five."}]]
    references = [upstream_greedy(server, gemma, template, chats[0], images["test-1"])["tokens"],
                  upstream_greedy(server, gemma, template, chats[1], images["grey"])["tokens"],
                  upstream_greedy(server, gemma, template, chats[2])["tokens"]]

    async def run():
        async_model = await mullama.AsyncModel.load(gemma_path, mmproj=mmproj, parallel=2, n_ctx=1024)

        async def read(messages, **options):
            stream = async_model.chat_stream(messages, max_tokens=N_PREDICT, temperature=0, chat_template=template,
                                             **options)
            return [token.id async for token in stream]

        try:
            alone = [await read(chats[0], cache_prompt=False), await read(chats[1], cache_prompt=False)]
            together = await asyncio.gather(read(chats[0]), read(chats[2]), read(chats[1]))
            return alone, together, await read(chats[2], cache_prompt=False)
        finally:
            await async_model.aclose()

    alone, together, text_after = asyncio.run(run())
    assert alone == references[:2]
    assert all(together)
    assert text_after == references[2]


def test_the_openai_client_gets_llama_servers_answer_from_mullama_serve(gemma_path, mmproj, server, template, images):
    messages = image_messages(data_uri(images["test-1"]), "Describe the picture in one sentence:")
    expected = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": N_PREDICT, "temperature": 0,
                                                    "cache_prompt": False})
    running = MullamaServer(gemma_path, parallel=2, ctx_size=2048,
                            extra=("--mmproj", str(mmproj), "--chat-template-file", str(template)))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused")
        answer = client.chat.completions.create(model="gemma3", messages=messages, max_tokens=N_PREDICT,
                                                temperature=0)
        assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
        assert answer.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
        assert answer.usage.prompt_tokens > IMAGE_TOKENS
    finally:
        assert running.process.poll() is None, "the server died"
        running.close()
