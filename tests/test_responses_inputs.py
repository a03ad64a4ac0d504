"""What /v1/responses makes of its inputs, on the real server and model, compared with the chat
route's answer to the same conversation: ``input_image`` parts become chat's ``image_url`` parts
(test_vision_server compares them with llama-server --mmproj's answers)."""

from __future__ import annotations

import httpx


def test_an_image_to_a_text_only_model_is_the_chat_routes_refusal(served):
    """An input_image part becomes chat's image_url part (as llama-server converts it, in a message or
    a function_call_output): a model served without a projector refuses it as the chat route does."""
    image = "data:image/png;base64,iVBORw0KGgo="
    chat = httpx.post(f"{served.url}/v1/chat/completions", timeout=60, json={"max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": image}}]}]})
    for item in ({"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                              {"type": "input_image", "image_url": image, "detail": "auto"}]},
                 {"type": "function_call_output", "call_id": "call_1", "output": [
                     {"type": "input_text", "text": "The photo:"}, {"type": "input_image", "image_url": image}]}):
        response = httpx.post(f"{served.url}/v1/responses", json={"input": [item], "max_output_tokens": 2}, timeout=60)
        assert response.status_code == chat.status_code == 400
        error, expected = response.json()["error"], chat.json()["error"]
        assert error["message"] == expected["message"] and "text only" in error["message"]
        assert (error["code"], error["param"]) == (expected["code"], "input")
