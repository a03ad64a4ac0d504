"""Reasoning (thinking) content on the real default model with upstream's thinking templates
(DeepSeek-R1, Qwen3): the thought is kept apart exactly as llama-server's --reasoning-format auto
keeps it, in Python and over HTTP."""

from __future__ import annotations

import json

import httpx
import ollama
import pytest
import upstream
from inprocess_server import serving
from upstream import template_path

import mullama
from mullama.chat._reasoning import Reasoning, ReasoningParser
from mullama.generate._context import default_threads
from mullama.server import ServerSettings

TEMPLATES = ["deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", "Qwen-Qwen3-0.6B.jinja"]
QUESTION = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.mark.parametrize("name", TEMPLATES)
def test_reasoning_and_content_equal_llama_server(name, build, model_path):
    path = template_path(build, name)
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(),
                                  extra=("--jinja", "--chat-template-file", str(path)))
    try:
        with mullama.Model.load(model_path, chat_template=path) as model, \
                mullama.Context(model, n_ctx=4096) as context:
            for kwargs in ({}, {"chat_template_kwargs": {"enable_thinking": False}}):
                reference = server.post("/v1/chat/completions", {
                    "messages": QUESTION, "max_tokens": 40, "temperature": 0, "cache_prompt": False, **kwargs})
                message = reference["choices"][0]["message"]
                stream = context.chat_stream(QUESTION, max_tokens=40, temperature=0, **kwargs)
                tokens = list(stream)
                assert stream.text == (message.get("content") or ""), kwargs
                assert stream.reasoning == (message.get("reasoning_content") or ""), kwargs
                assert "".join(t.text for t in tokens if t.kind == "reasoning") == stream.reasoning
                assert "".join(t.text for t in tokens if t.kind == "content") == stream.text
    finally:
        server.close()


def test_an_opened_thought_is_reasoning_and_none_keeps_it_inline(build, model_path):
    path = template_path(build, TEMPLATES[0])  # DeepSeek-R1 opens <think> at the end of the prompt
    with mullama.Model.load(model_path, chat_template=path) as model, mullama.Context(model, n_ctx=4096) as context:
        split = context.chat_stream(QUESTION, max_tokens=24, temperature=0)
        list(split)
        inline = context.chat_stream(QUESTION, max_tokens=24, temperature=0, reasoning_format="none")
        list(inline)
        assert model.apply_chat_template(QUESTION).endswith("<think>\n")
    assert split.reasoning and split.text == ""
    # The thought counts the prompt's "\n" after <think>, as llama-server does; inline, the output is the text.
    assert inline.reasoning == "" and split.reasoning == "\n" + inline.text


@pytest.mark.parametrize("opened", [False, True])
def test_the_parser_gives_the_same_split_whatever_the_token_boundaries(opened):
    text = "  <think>Let me think: 2 < 3, and </thin is not the end.</think>\n\nThe answer is <think> 42."
    if opened:
        text = text.replace("  <think>", "", 1)
    whole = ReasoningParser(Reasoning(opened=opened))
    expected = whole.feed(text)
    finished = whole.finish()
    expected = (expected[0] + finished[0], expected[1] + finished[1])
    assert expected == ("The answer is <think> 42.", "Let me think: 2 < 3, and </thin is not the end.")
    for cut in range(1, len(text)):
        for second_cut in (cut, min(len(text), cut + 3)):
            parser = ReasoningParser(Reasoning(opened=opened))
            parts = [parser.feed(text[:cut]), parser.feed(text[cut:second_cut]), parser.feed(text[second_cut:]),
                     parser.finish()]
            assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == expected, (cut, second_cut)


def test_the_server_sends_reasoning_content_streamed_and_not(build, model_path):
    path = template_path(build, TEMPLATES[0])
    with mullama.Model.load(model_path, chat_template=path) as model, \
            serving(model, settings=ServerSettings(model_name="r1-template"), parallel=1, n_ctx=2048) as (server, _):
        body = {"messages": QUESTION, "max_tokens": 24, "temperature": 0}
        whole = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120).json()
        message = whole["choices"][0]["message"]
        assert message["reasoning_content"] and message["content"] == ""
        thought, content = [], []
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    thought.append(delta.get("reasoning_content") or "")
                    content.append(delta.get("content") or "")
        assert "".join(thought) == message["reasoning_content"] and "".join(content) == ""
        bad = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "reasoning_format": "x"}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_format"


def test_ollama_think_needs_a_model_that_thinks(build, model_path, served):
    """ollama's ``think: true`` (or a level) on a model whose template has no thought is ollama's 400;
    ``think: false`` is accepted; a thinking template takes ``think: true``."""
    plain = ollama.Client(host=served.url)
    for think in (True, "low"):
        with pytest.raises(ollama.ResponseError) as refused:
            plain.chat(model="smollm2:135m", messages=QUESTION, think=think, options={"num_predict": 4})
        assert refused.value.status_code == 400 and refused.value.error == '"smollm2:135m" does not support thinking'
    with pytest.raises(ollama.ResponseError, match="does not support thinking"):
        plain.generate(model="smollm2:135m", prompt="Why?", think=True, options={"num_predict": 4})
    assert plain.chat(model="smollm2:135m", messages=QUESTION, think=False, options={"num_predict": 4}).done
    with mullama.Model.load(model_path, chat_template=template_path(build, TEMPLATES[0])) as model, \
            serving(model, settings=ServerSettings(model_name="r1-template"), parallel=1, n_ctx=2048) as (server, _):
        answer = ollama.Client(host=server.url).chat(model="r1-template", messages=QUESTION, think=True,
                                                     options={"num_predict": 4})
        assert answer.done and answer.eval_count == 4


# gpt-oss's template writes the level; Qwen3's has no such variable: "none" turns its thinking off, a level
# leaves its prompt as it was.
@pytest.mark.parametrize("name, efforts, prompts_made", [("openai-gpt-oss-120b.jinja", ("high", "low"), 3),
                                                         ("Qwen-Qwen3-0.6B.jinja", ("none", "medium"), 2)])
def test_reasoning_effort_reaches_the_template_as_llama_servers(name, efforts, prompts_made, build, model_path):
    """OpenAI's ``reasoning_effort`` (chat) and ``reasoning.effort`` (Responses) as llama-server gives them to
    the template: "none" turns thinking off, another level is the template's ``reasoning_effort``."""
    path = template_path(build, name)
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(),
                                  extra=("--jinja", "--chat-template-file", str(path)))
    try:
        with mullama.Model.load(model_path, chat_template=path) as model, \
                serving(model, settings=ServerSettings(model_name="m"), parallel=1, n_ctx=2048) as (ours, _):
            prompts = set()
            for effort in (None, *efforts):
                body = {"messages": QUESTION, **({"reasoning_effort": effort} if effort else {})}
                prompt = httpx.post(f"{ours.url}/apply-template", json=body, timeout=60).json()["prompt"]
                assert prompt == server.post("/apply-template", body)["prompt"], effort
                prompts.add(prompt)
                chat = httpx.post(f"{ours.url}/v1/chat/completions", timeout=60,
                                  json={**body, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
                responses = httpx.post(f"{ours.url}/v1/responses/input_tokens", timeout=60, json={
                    "input": QUESTION, **({"reasoning": {"effort": effort}} if effort else {})}).json()
                assert responses["input_tokens"] == chat, effort
            assert len(prompts) == prompts_made
            refused = httpx.post(f"{ours.url}/v1/chat/completions", json={**body, "reasoning_effort": 3}, timeout=60)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "reasoning_effort"
            refused = httpx.post(f"{ours.url}/v1/responses", json={"input": "Hi", "reasoning": "low"}, timeout=60)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "reasoning"
    finally:
        server.close()
