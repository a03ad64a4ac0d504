"""ollama's API on the real server and model, driven by the official `ollama` Python client:
answers equal the OpenAI routes' for the same request, streamed and not; model listings;
embeddings; tools; errors in ollama's shape."""

from __future__ import annotations

import httpx
import ollama  # the test extra installs it: a missing package fails, never skips
import openai
import pytest
from inprocess_server import serving
from upstream import template_path

import mullama
from mullama.server import ServerSettings

GREEDY = {"temperature": 0, "num_predict": 24}
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a planet."}]


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
