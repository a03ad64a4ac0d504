"""Images through ``mullama serve --mmproj``: OpenAI image_url (data URIs, files below --media-path),
Anthropic image blocks and ollama images, sent by the official clients unchanged; answers equal
llama-server --mmproj's on the same files; limits give a clear 400/413 with the error's code, and a
corpus of malformed files never stops the server."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import anthropic
import ollama
import openai
import pytest
import upstream
from mullama_server import MullamaServer
from test_vision import N_PREDICT, QUESTION, _bmp, data_uri, image_messages, make_projector, malformed_corpus

from mullama.generate._context import default_threads

MAX_MEDIA_BYTES = 150_000  # test-1.jpeg has 124071 bytes


@pytest.fixture(scope="module")
def media_dir(build, tmp_path_factory) -> Path:
    """--media-path: the test image, and an image larger than the server's limit."""
    directory = tmp_path_factory.mktemp("media")
    image = Path(build.manifest["source"]) / "tools" / "mtmd" / "test-1.jpeg"
    (directory / "test-1.jpeg").write_bytes(image.read_bytes())
    (directory / "big.bmp").write_bytes(_bmp(256, 256, (10, 200, 30)))  # 196662 bytes
    return directory


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory, model_path) -> Path:
    return make_projector(tmp_path_factory.mktemp("mmproj") / "mmproj.gguf", model_path)


@pytest.fixture(scope="module")
def server(model_path, mmproj, media_dir):
    running = MullamaServer(model_path, parallel=2, ctx_size=4096,
                            extra=("--mmproj", str(mmproj), "--media-path", str(media_dir),
                                   "--max-media-bytes", str(MAX_MEDIA_BYTES)))
    yield running
    assert running.process.poll() is None, "the server died"
    running.close()


def responses_inputs(url: str) -> dict[str, list[dict]]:
    """Responses inputs with an image: in a user message (the chat's text_first messages), and in a
    function_call_output after the call."""
    return {"message": [{"role": "user", "content": [{"type": "input_text", "text": QUESTION},
                                                     {"type": "input_image", "image_url": url}]}],
            "tool_output": [{"role": "user", "content": "Take a photo and describe it."},
                            {"type": "function_call", "call_id": "call_1", "name": "camera", "arguments": "{}"},
                            {"type": "function_call_output", "call_id": "call_1", "output": [
                                {"type": "input_text", "text": "The photo:"},
                                {"type": "input_image", "image_url": url}]}]}


def responses_body(items: list[dict]) -> dict:
    return {"input": items, "max_output_tokens": N_PREDICT, "temperature": 0, "cache_prompt": False}


@pytest.fixture(scope="module")
def reference(build, model_path, mmproj, media_dir) -> dict:
    """llama-server --mmproj's greedy answers (OpenAI chat, Anthropic messages and OpenAI Responses) for
    test-1.jpeg."""
    running = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(), n_ctx=4096,
                                   extra=("--mmproj", str(mmproj)))
    try:
        image = media_dir / "test-1.jpeg"
        chat = running.post("/v1/chat/completions", {"messages": image_messages(data_uri(image)),
                                                     "max_tokens": N_PREDICT, "temperature": 0, "cache_prompt": False})
        after = running.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image)}},
                                                      {"type": "text", "text": QUESTION}]}],
            "max_tokens": N_PREDICT, "temperature": 0, "cache_prompt": False})
        responses = {name: running.post("/v1/responses", responses_body(items))
                     for name, items in responses_inputs(data_uri(image)).items()}
        return {"text_first": chat, "image_first": after, "responses": responses}
    finally:
        running.close()


def test_the_openai_client_sends_an_image_and_gets_llama_servers_answer(server, reference, media_dir):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages = image_messages(data_uri(media_dir / "test-1.jpeg"))
    answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=N_PREDICT, temperature=0)
    expected = reference["text_first"]
    assert answer.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert answer.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert answer.usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_a_file_below_the_media_path_is_read_and_others_are_refused(server, reference, media_dir):
    status, body = server.post("/v1/chat/completions", {"messages": image_messages("test-1.jpeg"),
                                                        "max_tokens": N_PREDICT, "temperature": 0})
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == reference["text_first"]["choices"][0]["message"]["content"]
    for outside in ("../../etc/passwd", "/etc/passwd", "file:///etc/hostname"):
        status, body = server.post("/v1/chat/completions", {"messages": image_messages(outside), "max_tokens": 2})
        assert status == 400, (outside, body)


def test_the_anthropic_client_sends_an_image_block(server, reference, media_dir):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused")
    data = base64.b64encode((media_dir / "test-1.jpeg").read_bytes()).decode()
    # The SDK has no temperature argument any more; the API field still exists.
    message = client.messages.create(model="smollm2", max_tokens=N_PREDICT, extra_body={"temperature": 0}, messages=[{
        "role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                                                 "data": data}},
                                    {"type": "text", "text": QUESTION}]}])
    expected = reference["image_first"]
    assert message.content[0].text == expected["choices"][0]["message"]["content"]
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == expected["usage"]["prompt_tokens"]


def message_texts(response: dict) -> list[str]:
    return [part["text"] for item in response["output"] if item["type"] == "message" for part in item["content"]]


def test_a_responses_input_image_is_llama_servers_answer(server, reference, media_dir):
    """An input_image part (in a message, or in a function_call_output) is the image llama-server's
    /v1/responses sees: the same prompt tokens and greedy answer; the message's equals the chat route's."""
    for name, items in responses_inputs(data_uri(media_dir / "test-1.jpeg")).items():
        status, body = server.post("/v1/responses", responses_body(items))
        assert status == 200, body
        expected = reference["responses"][name]
        assert message_texts(body) == message_texts(expected) != [], name
        for field in ("input_tokens", "output_tokens"):
            assert body["usage"][field] == expected["usage"][field], (name, field)
        if name == "message":
            chat = reference["text_first"]
            assert message_texts(body) == [chat["choices"][0]["message"]["content"]]
            assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]


def test_the_ollama_client_sends_images(server, reference, media_dir):
    client = ollama.Client(host=server.url)
    answer = client.chat(model="smollm2", messages=[{"role": "user", "content": QUESTION,
                                                     "images": [str(media_dir / "test-1.jpeg")]}],
                         options={"temperature": 0, "num_predict": N_PREDICT})
    expected = reference["text_first"]
    assert answer.message.content == expected["choices"][0]["message"]["content"]
    assert answer.prompt_eval_count == expected["usage"]["prompt_tokens"]
    generated = client.generate(model="smollm2", prompt=QUESTION, images=[(media_dir / "test-1.jpeg").read_bytes()],
                                options={"temperature": 0, "num_predict": N_PREDICT})
    assert generated.response == answer.message.content


def test_limits_give_413_and_400_with_the_errors_code(server, media_dir):
    small = "data:image/bmp;base64," + base64.b64encode(_bmp(8, 8, (1, 2, 3))).decode()
    cases = [
        (image_messages("big.bmp"), 413, "MEDIA_TOO_LARGE"),
        (image_messages(data_uri(media_dir / "big.bmp", "image/bmp")), 413, "MEDIA_TOO_LARGE"),
        (image_messages("https://example.com/cat.jpg"), 400, "REMOTE_MEDIA_REFUSED"),
        (image_messages("data:text/plain;base64,aGVsbG8="), 400, "INVALID_MEDIA"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": small}}
                                       for _ in range(9)] + [{"type": "text", "text": "?"}]}], 413, "MEDIA_TOO_LARGE"),
    ]
    for messages, status, code in cases:
        got, body = server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 2})
        assert (got, body["error"]["code"]) == (status, code), body
        assert body["error"]["message"]


def test_remote_media_is_fetched_only_when_allowed(model_path, mmproj, media_dir):
    """--allow-remote-media: an http URL (a real file server on 127.0.0.1) is fetched, within the limit."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    running = MullamaServer(model_path, parallel=1, ctx_size=2048,
                            extra=("--mmproj", str(mmproj), "--allow-remote-media",
                                   "--max-media-bytes", str(MAX_MEDIA_BYTES)))
    try:
        status, body = running.post("/v1/chat/completions", {"messages": image_messages(f"{base}/test-1.jpeg"),
                                                             "max_tokens": 4, "temperature": 0})
        assert status == 200, body
        status, body = running.post("/v1/chat/completions", {"messages": image_messages(f"{base}/big.bmp"),
                                                             "max_tokens": 4})
        assert (status, body["error"]["code"]) == (413, "MEDIA_TOO_LARGE")
    finally:
        running.close()
        files.shutdown()


def test_a_corpus_of_malformed_images_gives_only_4xx_and_the_server_goes_on(server, media_dir, tmp_path):
    corpus = malformed_corpus(media_dir / "test-1.jpeg", tmp_path)
    assert len(corpus) >= 50
    statuses = {}
    for path in corpus:
        for mime in ("image/jpeg", "image/png"):
            status, body = server.post("/v1/chat/completions", {"messages": image_messages(data_uri(path, mime)),
                                                                "max_tokens": 2})
            statuses[(path.name, mime)] = status
            assert status in (400, 413), (path.name, status, body)
            assert body["error"]["code"] in ("INVALID_MEDIA", "MEDIA_TOO_LARGE"), body
    # Anthropic and ollama shapes of the same hostile bytes
    for path in corpus[:10]:
        data = base64.b64encode(path.read_bytes()).decode() or "AA=="
        status, body = server.post("/v1/messages", {"model": "smollm2", "max_tokens": 2, "messages": [{
            "role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                     "data": data}}, {"type": "text", "text": "?"}]}]})
        assert status in (400, 413), (path.name, status, body)
        chat = {"model": "smollm2", "stream": False, "messages": [{"role": "user", "content": "?", "images": [data]}]}
        request = urllib.request.Request(f"{server.url}/api/chat", data=json.dumps(chat).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code in (400, 413)
    assert server.process.poll() is None
    status, body = server.post("/v1/chat/completions", {"messages": image_messages("test-1.jpeg"), "max_tokens": 2})
    assert status == 200, body
