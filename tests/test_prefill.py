"""Assistant prefill: a trailing assistant message is the start of the answer, continued as llama-server
continues it (its default ``prefill_assistant``): the same prompt for every template tried, the same greedy
tokens; OpenAI's route answers with the message's text first (as llama-server does), Anthropic's and
ollama's and the Python API with what was generated after it (Anthropic's documented prefill)."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
import upstream
from upstream import template_path

import mullama
from mullama.generate._chat_turn import chat_prompt
from mullama.generate._config import StreamConfig
from mullama.generate._context import default_threads

COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."},
         {"role": "assistant", "content": "1, 2, 3,"}]
CASES = {
    "prefill": COUNT,
    "with a system message": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "The colour is"}],
    "after turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Reply in JSON"}, {"role": "assistant", "content": "{"}],
    "a thought only": [{"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "", "reasoning_content": "Let me add"}],
    "a thought and text": [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "It is", "reasoning_content": "Simple sum."}],
    "no prefill, a system message": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
}
# None: the model's own (ChatML). Llama 3.1 prints today's date (llama.cpp passes date_string); Qwen3 writes
# its thought between "<think>\n" and "\n</think>\n\n"; Gemma 2 has no system role (merged into the user's).
TEMPLATES = [None, "Qwen-Qwen2.5-7B-Instruct.jinja", "meta-llama-Llama-3.1-8B-Instruct.jinja",
             "Qwen-Qwen3-0.6B.jinja", "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", "google-gemma-2-2b-it.jinja"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_the_prompt_is_llama_servers(name, build, model_path, model):
    path = template_path(build, name) if name else None
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(),
                                  extra=("--jinja", "--chat-template-file", str(path)) if path else ())
    try:
        for case, messages in CASES.items():
            expected = server.post("/apply-template", {"messages": messages})["prompt"]
            ours, _config = chat_prompt(model, messages, StreamConfig(), tools=None, tool_choice="auto",
                                        parallel_tool_calls=False, chat_template=path, chat_template_kwargs=None)
            assert ours == expected, (name, case)
    finally:
        server.close()


@pytest.fixture(scope="module")
def reference(llama_server) -> dict:
    """llama-server's greedy answer to COUNT (its content starts with the prefill)."""
    reply = llama_server.post("/v1/chat/completions", {"messages": COUNT, "max_tokens": 12, "temperature": 0,
                                                       "cache_prompt": False})
    return {"content": reply["choices"][0]["message"]["content"], "usage": reply["usage"]}


def test_greedy_continuation_equals_llama_servers_on_every_route(reference, served, context):
    prefill = COUNT[-1]["content"]
    assert reference["content"].startswith(prefill) and len(reference["content"]) > len(prefill)
    generated = reference["content"][len(prefill):]

    gpt = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    reply = gpt.chat.completions.create(model="m", messages=COUNT, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == reference["content"]  # llama-server's answer, prefill first
    assert reply.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == reference["usage"]["completion_tokens"]
    chunks = gpt.chat.completions.create(model="m", messages=COUNT, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference["content"]

    # Anthropic documents prefill: the answer is what follows the prefilled text.
    claude = anthropic.Anthropic(base_url=served.url, api_key="unused")
    message = claude.messages.create(model="m", max_tokens=12, messages=COUNT, extra_body={"temperature": 0})
    assert message.content[0].text == generated
    with claude.messages.stream(model="m", max_tokens=12, messages=COUNT, extra_body={"temperature": 0}) as stream:
        assert "".join(stream.text_stream) == generated

    # ollama answers with the continuation too; so does the Python API (its stream is what was generated).
    body = {"model": "m", "messages": COUNT, "stream": False, "options": {"temperature": 0, "num_predict": 12}}
    assert httpx.post(f"{served.url}/api/chat", json=body, timeout=300).json()["message"]["content"] == generated
    assert "".join(t.text for t in context.chat_stream(COUNT, max_tokens=12, temperature=0)) == generated


@pytest.mark.parametrize("messages, says", [
    ([COUNT[0], {"role": "assistant", "content": "1,"}, {"role": "assistant", "content": " 2,"}], "two assistant"),
    ([COUNT[0], {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}], "tool_calls"),
    ([{"role": "assistant", "content": "Hello"}], "only message"),
])
def test_messages_that_cannot_be_continued_are_refused(messages, says, model, served):
    with pytest.raises(mullama.InvalidConfigError, match=says):
        chat_prompt(model, messages, StreamConfig(), tools=None, tool_choice="auto", parallel_tool_calls=False,
                    chat_template=None, chat_template_kwargs=None)
    reply = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 4}, timeout=60)
    assert reply.status_code == 400 and says in reply.json()["error"]["message"]


def test_a_prefill_with_a_json_schema_is_refused(served):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    reply = httpx.post(f"{served.url}/v1/chat/completions", timeout=60, content=json.dumps(
        {"messages": COUNT, "max_tokens": 4,
         "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}))
    assert reply.status_code == 400 and "prefill" in reply.json()["error"]["message"]
