"""ollama's API as ollama 0.13 answers it, on the real server and model, through the official ``ollama``
client: token logprobs, chat history truncated to fit the context, the capabilities ``/api/show`` lists,
and routes mullama does not serve answered in ollama's error shape."""

from __future__ import annotations

import httpx
import ollama  # the test extra installs it: a missing package fails, never skips
import pytest


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

