"""ollama's API on the real server and model, driven by the official `ollama` Python client and
by the clients that speak ollama's API (LiteLLM's ``ollama_chat/`` and ``ollama/`` providers,
LangChain's ChatOllama): answers equal the OpenAI routes' for the same request, streamed and not;
model listings, copies and deletes; embeddings, legacy ones too; tools; errors in ollama's shape."""

from __future__ import annotations

import json
import os
import time

import httpx
import ollama  # the test extra installs it: a missing package fails, never skips
import openai
import pytest
from inprocess_server import serving
from mullama_server import MullamaServer
from upstream import template_path

import mullama
from mullama.server import ServerSettings

GREEDY = {"temperature": 0, "num_predict": 24}
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a planet."}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def clients(served):
    return ollama.Client(host=served.url), openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")


def test_chat_equals_the_openai_route_streamed_and_not(clients):
    client, gpt = clients
    reference = gpt.chat.completions.create(model="m", messages=MESSAGES, max_tokens=24, temperature=0)
    expected = reference.choices[0].message.content
    whole = client.chat(model="smollm2:135m", messages=MESSAGES, options=GREEDY)
    assert whole.message.role == "assistant" and whole.message.content == expected
    assert whole.done and whole.done_reason == {"stop": "stop", "length": "length"}[reference.choices[0].finish_reason]
    assert whole.eval_count == reference.usage.completion_tokens
    assert whole.prompt_eval_count == reference.usage.prompt_tokens and whole.total_duration > 0
    chunks = list(client.chat(model="smollm2:135m", messages=MESSAGES, options=GREEDY, stream=True))
    assert "".join(chunk.message.content for chunk in chunks) == expected
    assert [chunk.done for chunk in chunks].count(True) == 1 and chunks[-1].done


def test_generate_with_and_without_the_template(clients):
    client, gpt = clients
    templated = client.generate(model="m", prompt="Name a planet.", system="Answer briefly.", options=GREEDY)
    chat = gpt.chat.completions.create(model="m", messages=MESSAGES, max_tokens=24, temperature=0)
    assert templated.response == chat.choices[0].message.content
    raw = client.generate(model="m", prompt="The capital of France is", raw=True, options=GREEDY)
    completion = gpt.completions.create(model="m", prompt="The capital of France is", max_tokens=24, temperature=0)
    assert raw.response == completion.choices[0].text
    streamed = "".join(part.response for part in client.generate(model="m", prompt="The capital of France is",
                                                                 raw=True, options=GREEDY, stream=True))
    assert streamed == raw.response


def test_format_json_and_options(clients):
    client, _ = clients
    reply = client.chat(model="m", messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
                        format={"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
                        options={"temperature": 0, "num_predict": 60, "stop": ["\n\n\n"], "seed": 3})
    assert reply.message.content.lstrip().startswith("{")


def test_listings_show_version_and_embed(clients, served, model):
    client, _ = clients
    (listed,) = client.list().models
    assert listed.model == "smollm2:135m" and listed.details.family == "llama"
    assert listed.details.quantization_level == "Q4_1" and listed.size == model.path.stat().st_size
    assert client.ps().models[0].model == "smollm2:135m"
    shown = client.show("smollm2:135m")
    assert shown.details.format == "gguf" and "im_start" in (shown.template or "")
    assert httpx.get(f"{served.url}/api/version", timeout=10).json()["version"]  # (not in every client release)
    embedded = client.embed(model="m", input=["a cat", "a dog"])
    assert len(embedded.embeddings) == 2 and embedded.prompt_eval_count > 0
    assert max(abs(a - b) for a, b in zip(embedded.embeddings[0], model.embed_one("a cat"))) < 1e-6


def test_tools_through_the_ollama_client(build, model_path):
    template = template_path(build, "Qwen-Qwen2.5-7B-Instruct.jinja")
    with mullama.Model.load(model_path, chat_template=template) as qwen, \
            serving(qwen, settings=ServerSettings(model_name="m"), parallel=1, n_ctx=2048) as (server, _engine):
        client = ollama.Client(host=server.url)
        tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}}]
        question = [{"role": "user", "content": "What is the weather in Paris?"}]
        # ollama has no tool_choice: a model that calls, calls; this one answers in text (as llama-server)
        reply = client.chat(model="m", messages=question, tools=tools, options={"temperature": 0,
                                                                               "num_predict": 40})
        assert reply.message.content or reply.message.tool_calls
        history = [*question, {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "18 degrees celsius, sunny"}]
        answer = client.chat(model="m", messages=history, tools=tools, options={"temperature": 0,
                                                                               "num_predict": 30})
        assert answer.message.content


@pytest.mark.parametrize("path, body", [
    ("/api/chat", {"model": "m", "messages": 5}),
    ("/api/chat", {"model": "m", "messages": "hi"}),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "options": {"temperature": "hot"}}),
    ("/api/chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "format": "xml"}),
    ("/api/generate", {"model": "m", "prompt": ["hi"]}),
    ("/api/generate", {"model": "m", "keep_alive": "soon"}),
    ("/api/generate", {"model": "m", "prompt": "hi", "template": "{{ .Prompt }}"}),
    ("/api/embed", {"model": "m", "input": []}),
])
def test_bad_requests_get_ollama_errors(served, path, body):
    response = httpx.post(f"{served.url}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"} and response.json()["error"]


def test_the_client_raises_its_response_error(clients):
    client, _ = clients
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model="m", prompt="hi", keep_alive="soon")
    assert caught.value.status_code == 400
    assert "keep_alive" in caught.value.error


def test_legacy_embeddings_are_ollama_s_raw_vectors(clients, served, model):
    """``/api/embeddings`` (``Client.embeddings``): one prompt, the vector not scaled to unit length,
    as ollama answers it; an empty prompt loads the model and answers an empty vector."""
    client, _ = clients
    legacy = client.embeddings(model="smollm2:135m", prompt="a cat").embedding
    raw = model.embed("a cat", normalize=False)[0]
    assert len(legacy) == model.n_embd and max(abs(a - b) for a, b in zip(legacy, raw)) < 1e-5
    unit = client.embed(model="smollm2:135m", input="a cat").embeddings[0]
    scale = sum(x * x for x in legacy) ** 0.5
    assert scale > 1.5 and max(abs(a / scale - b) for a, b in zip(legacy, unit)) < 1e-6
    assert client.embeddings(model="smollm2:135m", prompt="").embedding == []
    refused = httpx.post(f"{served.url}/api/embeddings", json={"model": "m", "prompt": ["a", "b"]}, timeout=30)
    assert refused.status_code == 400 and "prompt" in refused.json()["error"]


@pytest.fixture(scope="module")
def routed(model_path):
    """A real ``mullama serve --models``: an unknown name is a 404 there, so names matter."""
    server = MullamaServer(None, parallel=1, ctx_size=1024, extra=("--models", "smollm2:135m"))
    yield server
    assert server.close() == 0


def test_copy_adds_a_name_that_listings_show_and_delete_removes_it(routed):
    client = ollama.Client(host=routed.url)
    question = [{"role": "user", "content": "Name a planet."}]
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="my-assistant", messages=question, options=GREEDY)
    assert unknown.value.status_code == 404
    assert client.copy("smollm2:135m", "my-assistant").status == "success"
    assert {m.model for m in client.list().models} == {"smollm2:135m", "my-assistant"}
    (listed,) = routed.get_json("/v1/models")["data"]
    assert listed["id"] == "smollm2:135m" and "my-assistant" in listed["aliases"]
    copied = client.chat(model="my-assistant:latest", messages=question, options=GREEDY)
    original = client.chat(model="smollm2:135m", messages=question, options=GREEDY)
    assert copied.message.content == original.message.content and copied.model == "my-assistant:latest"
    assert client.show("my-assistant").details.family == "llama"

    for source, destination, status in (("nope", "x", 404), ("smollm2:135m", "../etc/passwd", 400),
                                        ("smollm2:135m", "", 400)):
        with pytest.raises(ollama.ResponseError) as refused:
            client.copy(source, destination)
        assert refused.value.status_code == status, refused.value.error
    assert client.copy("smollm2:135m", "smollm2").status == "success"  # already one of its names: nothing to do

    with pytest.raises(ollama.ResponseError) as served:
        client.delete("smollm2:135m")  # a model the server was started with stays
    assert served.value.status_code == 400 and "started with" in served.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("never-there")
    assert missing.value.status_code == 404 and missing.value.error == "model 'never-there' not found"
    assert client.delete("my-assistant").status == "success"
    assert [m.model for m in client.list().models] == ["smollm2:135m"]
    assert "my-assistant" not in routed.get_json("/v1/models")["data"][0]["aliases"]
    with pytest.raises(ollama.ResponseError) as gone:
        client.chat(model="my-assistant", messages=question, options=GREEDY)
    assert gone.value.status_code == 404
    copied_again = httpx.post(f"{routed.url}/api/copy", json={"source": "smollm2", "destination": "again"}, timeout=30)
    assert copied_again.status_code == 200 and copied_again.content == b""  # as ollama's: an empty 200
    response = httpx.post(f"{routed.url}/api/delete", json={"model": "again"}, timeout=30)  # POST too
    assert response.status_code == 200 and "again" not in routed.get_json("/v1/models")["data"][0]["aliases"]


# --- LiteLLM and LangChain, which speak ollama's API -----------------------------------------------
@pytest.fixture(scope="module")
def litellm():
    """LiteLLM, told not to fetch its model cost map from the network."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm  # the test extra installs it

    return litellm


def test_litellm_ollama_chat_streamed_and_not(litellm, clients, served):
    """``ollama_chat/`` posts /api/chat with no Content-Type: its answers equal the ollama client's."""
    client, _ = clients
    reference = client.chat(model="smollm2:135m", messages=MESSAGES, options=GREEDY)
    reply = litellm.completion(model="ollama_chat/smollm2:135m", api_base=served.url, messages=MESSAGES,
                               max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == reference.message.content
    assert reply.usage.prompt_tokens == reference.prompt_eval_count
    assert reply.usage.completion_tokens == reference.eval_count
    chunks = list(litellm.completion(model="ollama_chat/smollm2:135m", api_base=served.url, messages=MESSAGES,
                                     max_tokens=24, temperature=0, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == reference.message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_litellm_ollama_chat_with_tools(litellm, served):
    """LiteLLM's ollama_chat tools path (it passes ``tools`` and drops ``tool_choice``): the request
    succeeds and the answer is well-formed, whether the model calls the tool or answers in text."""
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    for stream in (False, True):
        reply = litellm.completion(model="ollama_chat/smollm2:135m", api_base=served.url, messages=question,
                                   tools=[WEATHER_TOOL], tool_choice="auto", max_tokens=40, temperature=0,
                                   stream=stream)
        if stream:
            reply = litellm.stream_chunk_builder(list(reply), messages=question)
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        assert choice.message.content or choice.message.tool_calls
        for call in choice.message.tool_calls or []:
            assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
        assert choice.finish_reason != "tool_calls" or choice.message.tool_calls
        assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 40


def test_litellm_ollama_generate(litellm, served):
    """``ollama/`` renders its own prompt and posts /api/generate: streamed and not, the same text."""
    question = [{"role": "user", "content": "Name a planet."}]
    reply = litellm.completion(model="ollama/smollm2:135m", api_base=served.url, messages=question,
                               max_tokens=24, temperature=0)
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 24
    chunks = list(litellm.completion(model="ollama/smollm2:135m", api_base=served.url, messages=question,
                                     max_tokens=24, temperature=0, stream=True))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == text


def test_langchain_chat_ollama_bind_tools_describes_the_tools(served):
    """ChatOllama.bind_tools sends ``tools`` on /api/chat: the call works, and the tools reach the
    prompt (more prompt tokens than the same question without them), even with a template that has
    no tools section of its own (the default model's)."""
    from langchain_ollama import ChatOllama

    chat = ChatOllama(model="smollm2:135m", base_url=served.url, temperature=0, num_predict=24)
    question = "What is the weather in Paris?"
    plain = chat.invoke(question)
    with_tools = chat.bind_tools([WEATHER_TOOL]).invoke(question)
    assert plain.content and (with_tools.content or with_tools.tool_calls)
    for call in with_tools.tool_calls:
        assert call["name"] == "get_weather" and isinstance(call["args"], dict)
    assert plain.usage_metadata["input_tokens"] == plain.response_metadata["prompt_eval_count"] > 0
    assert with_tools.usage_metadata["input_tokens"] > plain.usage_metadata["input_tokens"]


LONG_TEXT = "The cat sat on the mat and looked at the dog. " * 120  # well over the 512-token embedding batch


def test_embed_truncates_a_long_input_unless_told_not_to(clients, served, model):
    """ollama's ``truncate`` (default true): the input's beginning is embedded; false: a 400."""
    client, _ = clients
    tokens = model.tokenize(LONG_TEXT, add_special=True, parse_special=True)
    assert len(tokens) > 512
    expected = model.embed([LONG_TEXT], truncate=True)[0]
    for truncate in (None, True):
        embedded = client.embed(model="m", input=LONG_TEXT, truncate=truncate)
        assert max(abs(a - b) for a, b in zip(embedded.embeddings[0], expected)) < 1e-6
        assert embedded.prompt_eval_count == 512  # what was embedded
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model="m", input=["a cat", LONG_TEXT], truncate=False)
    assert caught.value.status_code == 400 and "input item 1" in caught.value.error
    refused = httpx.post(f"{served.url}/api/embed", json={"model": "m", "input": "a cat", "truncate": "yes"},
                         timeout=60)
    assert refused.status_code == 400 and "truncate" in refused.json()["error"]


def test_embed_dimensions_shorten_and_renormalise_each_vector(clients, served, model):
    """ollama's ``dimensions``: each vector cut to its first N values and scaled to unit length again."""
    client, _ = clients
    full = client.embed(model="m", input=["a cat", "a dog"]).embeddings
    short = client.embed(model="m", input=["a cat", "a dog"], dimensions=16).embeddings
    for whole, cut in zip(full, short):
        assert len(cut) == 16
        scale = sum(x * x for x in whole[:16]) ** 0.5
        assert max(abs(a - b / scale) for a, b in zip(cut, whole[:16])) < 1e-6
        assert abs(sum(x * x for x in cut) - 1) < 1e-6
    unchanged = client.embed(model="m", input="a cat", dimensions=model.n_embd + 10).embeddings[0]
    assert unchanged == full[0]  # no longer than asked: left as it is, as ollama does
    for dimensions in (0, -3, "16", 1.5):
        refused = httpx.post(f"{served.url}/api/embed", json={"model": "m", "input": "a cat",
                                                              "dimensions": dimensions}, timeout=60)
        assert refused.status_code == 400 and "dimensions" in refused.json()["error"]


def test_embed_keep_alive_is_checked(served):
    refused = httpx.post(f"{served.url}/api/embed", json={"model": "m", "input": "a cat", "keep_alive": "soon"},
                         timeout=60)
    assert refused.status_code == 400 and "keep_alive" in refused.json()["error"]


def test_embed_keep_alive_keeps_or_unloads_the_model():
    """On a server that loads models on demand: -1 keeps the model for ever, 0 unloads it after the request."""
    server = MullamaServer(None, parallel=1, ctx_size=1024, extra=("--models", "smollm2"))
    try:
        client = ollama.Client(host=server.url)
        client.embed(model="smollm2", input="a cat", keep_alive=-1)
        (entry,) = client.ps().models
        assert entry.model == "smollm2:135m" and entry.expires_at.year == 2999  # negative: for ever
        assert client.embed(model="smollm2", input="a cat", keep_alive=0).embeddings
        for _ in range(600):  # 0: unloaded once the request ends (the pool's idle check runs next)
            if not client.ps().models:
                break
            time.sleep(0.05)
        assert client.ps().models == []
    finally:
        server.close()
