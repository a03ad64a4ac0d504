"""ollama's API as ollama 0.13 answers it, on the real server and model, through the official ``ollama``
client: token logprobs, chat history truncated to fit the context, the capabilities ``/api/show`` lists,
and routes mullama does not serve answered in ollama's error shape."""

from __future__ import annotations

import httpx
import ollama  # the test extra installs it: a missing package fails, never skips
import pytest
from inprocess_server import serving
from upstream import template_path

import mullama
from mullama.server import ServerSettings


@pytest.fixture(scope="module")
def client(served):
    return ollama.Client(host=served.url)


# --- a route mullama does not serve ----------------------------------------------------------------
def test_an_unknown_api_route_is_an_ollama_error(client, served):
    """``POST /api/create`` (no such route here): the client's ResponseError carries the message, as it
    does for ollama's own errors; a wrong method on an /api route too. Other paths keep OpenAI's shape."""
    with pytest.raises(ollama.ResponseError) as caught:
        client.create(model="mine", from_="smollm2:135m")
    assert caught.value.status_code == 404
    assert caught.value.error == "POST /api/create: no such route."
    wrong_method = httpx.get(f"{served.url}/api/chat", timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.json() == {"error": "GET /api/chat: method not allowed."}
    elsewhere = httpx.post(f"{served.url}/v1/nothing", json={}, timeout=30)
    assert elsewhere.status_code == 404 and elsewhere.json()["error"]["message"] == "POST /v1/nothing: no such route."


# --- /api/show's capabilities ----------------------------------------------------------------------
def test_show_lists_tools_for_a_chat_template(client):
    """SmolLM2's template has no tools section, yet the server gives it tools (the generic format), so
    ollama's clients may turn tool calling on; it writes no thought, so no thinking."""
    assert client.show("smollm2:135m").capabilities == ["completion", "tools"]


def test_show_lists_thinking_for_a_thinking_template(build, model_path):
    """A model served with Qwen3's template (which writes a ``<think>`` thought) lists thinking, and the
    template shown is the one it is served with."""
    template = template_path(build, "Qwen-Qwen3-0.6B.jinja")
    with mullama.Model.load(model_path, chat_template=template) as qwen, \
            serving(qwen, settings=ServerSettings(model_name="m"), parallel=1, n_ctx=512) as (server, _engine):
        shown = ollama.Client(host=server.url).show("m")
        assert shown.capabilities == ["completion", "tools", "thinking"]
        assert "<think>" in shown.template and shown.template == qwen.chat_template
