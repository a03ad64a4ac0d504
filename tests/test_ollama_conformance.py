"""ollama's API as ollama 0.13 answers it, on the real server and model, through the official ``ollama``
client: token logprobs, chat history truncated to fit the context, the capabilities ``/api/show`` lists,
and routes mullama does not serve answered in ollama's error shape."""

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
def client(served):
    return ollama.Client(host=served.url)


def spelled(logprobs) -> str:
    return "".join(entry.token for entry in logprobs or ())


# --- logprobs --------------------------------------------------------------------------------------
def test_chat_logprobs_streamed_and_not_equal_the_openai_route_s(client, served):
    """``logprobs: true`` with ``top_logprobs``: the whole answer's logprobs spell its content, each with
    that many alternatives (greedy: the likeliest is the token chosen); a stream's chunks each carry
    those of the tokens whose text they bring; the tokens and values are the OpenAI route's."""
    whole = client.chat(model="m", messages=MESSAGES, options=GREEDY, logprobs=True, top_logprobs=3)
    assert whole.logprobs and spelled(whole.logprobs) == whole.message.content
    for entry in whole.logprobs:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob <= 0
        assert [top.logprob for top in entry.top_logprobs] == sorted((top.logprob for top in entry.top_logprobs),
                                                                     reverse=True)
    gpt = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    reference = gpt.chat.completions.create(model="m", messages=MESSAGES, max_tokens=24, temperature=0,
                                            logprobs=True, top_logprobs=3).choices[0].logprobs.content
    assert [entry.token for entry in whole.logprobs] == [entry.token for entry in reference]
    assert [entry.logprob for entry in whole.logprobs] == pytest.approx([entry.logprob for entry in reference],
                                                                        abs=1e-3)
    raw = httpx.post(f"{served.url}/api/chat", json={"model": "m", "messages": MESSAGES, "options": GREEDY,
                                                     "logprobs": True, "top_logprobs": 3, "stream": False},
                     timeout=60).json()["logprobs"]  # each with its bytes too (which the client does not keep)
    assert [entry["token"] for entry in raw] == [entry.token for entry in whole.logprobs]
    for entry in raw:
        assert entry["bytes"] == list(entry["token"].encode())
        assert all(top["bytes"] == list(top["token"].encode()) for top in entry["top_logprobs"])
    chunks = list(client.chat(model="m", messages=MESSAGES, options=GREEDY, logprobs=True, top_logprobs=3,
                              stream=True))
    for chunk in chunks[:-1]:
        assert spelled(chunk.logprobs) == chunk.message.content and chunk.message.content
    streamed = [entry for chunk in chunks for entry in chunk.logprobs or ()]
    assert [entry.token for entry in streamed] == [entry.token for entry in whole.logprobs]
    assert all(len(entry.top_logprobs) == 3 for entry in streamed)


def test_generate_logprobs_and_none_unless_asked(client):
    """/api/generate's too (raw and templated); ``top_logprobs`` 0 (or absent) lists no alternatives, and a
    request without ``logprobs`` gets none (``top_logprobs`` alone asks nothing, as ollama reads it)."""
    raw = client.generate(model="m", prompt="The capital of France is", raw=True, options=GREEDY, logprobs=True)
    assert raw.logprobs and spelled(raw.logprobs) == raw.response
    assert all(not entry.top_logprobs for entry in raw.logprobs)
    templated = client.generate(model="m", prompt="Name a planet.", options=GREEDY, logprobs=True, top_logprobs=0)
    assert spelled(templated.logprobs) == templated.response
    streamed = list(client.generate(model="m", prompt="Name a planet.", options=GREEDY, logprobs=True, stream=True))
    assert spelled(entry for part in streamed for entry in part.logprobs or ()) == templated.response
    assert client.chat(model="m", messages=MESSAGES, options=GREEDY, top_logprobs=5).logprobs is None
    assert client.generate(model="m", prompt="Name a planet.", options=GREEDY).logprobs is None


@pytest.mark.parametrize("fields, message", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs must be between 0 and 20"),
    ({"top_logprobs": 30}, "top_logprobs must be between 0 and 20"),  # checked without logprobs too, as ollama
    ({"logprobs": True, "top_logprobs": "3"}, "top_logprobs must be an integer between 0 and 20"),
    ({"logprobs": "yes"}, "'logprobs' must be true or false."),
])
def test_refused_logprobs_are_ollama_400s(client, served, fields, message):
    for path, body in (("/api/chat", {"messages": MESSAGES}), ("/api/generate", {"prompt": "Hi"})):
        refused = httpx.post(f"{served.url}{path}", json={"model": "m", **body, **fields}, timeout=60)
        assert refused.status_code == 400 and refused.json() == {"error": message}
    if isinstance(fields.get("top_logprobs"), int):
        with pytest.raises(ollama.ResponseError) as caught:
            client.chat(model="m", messages=MESSAGES, options=GREEDY, **fields)
        assert caught.value.status_code == 400 and caught.value.error == message


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


# --- truncate: a chat longer than the context ------------------------------------------------------
TURNS = ["Tell me about the oceans of the world and the animals that live in their deepest parts.",
         "Oceans cover most of the planet; whales, squid and many strange fish live far below the surface.",
         "And what about the mountains, the rivers and the forests that cover the continents of the world?",
         "Mountains rise where plates meet, rivers carve valleys, and forests hold most of the land's life.",
         "Which of the planets of the solar system is the largest one, and how many moons does it have?",
         "Jupiter is the largest planet of the solar system, and it has dozens of moons, Ganymede first."]
LONG_CHAT = [{"role": "system", "content": "Answer briefly."},
             *({"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(TURNS * 2)),
             {"role": "user", "content": "Name a planet."}]
SMALL_CTX = 256


@pytest.fixture(scope="module")
def small(model):
    """A server whose one stream holds 256 tokens: LONG_CHAT does not fit it."""
    with serving(model, settings=ServerSettings(model_name="m"), parallel=1, n_ctx=SMALL_CTX) as (server, _engine):
        yield server


def _chat(server, messages, **fields) -> httpx.Response:
    return httpx.post(f"{server.url}/api/chat", json={"model": "m", "messages": messages, "options": GREEDY,
                                                      "stream": False, **fields}, timeout=120)


def test_a_chat_too_long_loses_its_oldest_messages(small):
    """By default (ollama's truncate: true) the oldest turns are dropped, the system message kept, until the
    prompt fits with room for the answer; the answer is that of the shortened chat sent whole."""
    client = ollama.Client(host=small.url)
    assert _chat(small, LONG_CHAT, truncate=False).status_code == 400  # the whole chat does not fit
    answer = client.chat(model="m", messages=LONG_CHAT, options=GREEDY)
    room = GREEDY["num_predict"]
    assert answer.message.content and answer.prompt_eval_count + room <= SMALL_CTX
    for start in range(1, len(LONG_CHAT)):  # the fewest oldest messages dropped for it to fit with that room
        if LONG_CHAT[start]["role"] != "user":
            continue
        shortened = _chat(small, [LONG_CHAT[0], *LONG_CHAT[start:]], truncate=False)
        if shortened.status_code == 200 and shortened.json()["prompt_eval_count"] + room <= SMALL_CTX:
            break
    assert 1 < start < len(LONG_CHAT) - 1
    expected = shortened.json()
    assert (answer.prompt_eval_count, answer.message.content) == (expected["prompt_eval_count"],
                                                                 expected["message"]["content"])
    streamed = list(client.chat(model="m", messages=LONG_CHAT, options=GREEDY, stream=True))
    assert "".join(chunk.message.content for chunk in streamed) == answer.message.content


def test_truncate_false_or_a_last_message_too_long_is_refused(small):
    """``truncate: false`` (which the Python client's chat does not send: posted here) keeps every message:
    too long, ollama's 400; so is a last message that does not fit alone, whatever ``truncate`` says (it
    is never dropped), which the client raises."""
    refused = _chat(small, LONG_CHAT, truncate=False)
    assert refused.status_code == 400 and set(refused.json()) == {"error"} and "tokens" in refused.json()["error"]
    too_long = [LONG_CHAT[0], {"role": "user", "content": " ".join(TURNS * 3)}]
    assert _chat(small, too_long, truncate=True).status_code == 400
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=small.url).chat(model="m", messages=too_long, options=GREEDY)
    assert caught.value.status_code == 400 and "tokens" in caught.value.error
    assert _chat(small, LONG_CHAT, truncate="yes").json() == {"error": "'truncate' must be true or false."}


def test_a_shortened_history_starts_at_a_user_message_and_keeps_every_system_message():
    """Which messages survive (the prompt measured here as the messages kept): the fewest oldest dropped,
    the history restarting at a user message, so a tool result keeps its call; system messages stay."""
    from mullama.server._truncation import truncated

    history = [{"role": "system", "content": "s1"}, {"role": "user", "content": "u1"},
               {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]},
               {"role": "tool", "content": "t1"}, {"role": "system", "content": "s2"},
               {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"},
               {"role": "user", "content": "u3"}, {"role": "assistant", "content": "", "tool_calls": []},
               {"role": "tool", "content": "t3"}]

    def contents(most: int) -> list[str]:
        return [m["content"] for m in truncated(history, lambda kept: kept, lambda kept: len(kept) <= most)]

    assert contents(10) == ["s1", "u1", "", "t1", "s2", "u2", "a2", "u3", "", "t3"]  # fits: nothing dropped
    assert contents(9) == contents(7) == ["s1", "s2", "u2", "a2", "u3", "", "t3"]
    assert contents(6) == contents(5) == ["s1", "s2", "u3", "", "t3"]
    assert contents(2) == ["s1", "s2", "u3", "", "t3"]  # the last turn stays, fitting or not


# --- think: the thought apart, or off ----------------------------------------------------------------
def test_a_thought_comes_as_thinking_streamed_and_not_as_the_openai_routes_reasoning(build, model_path):
    """DeepSeek-R1's template opens <think> at the end of the prompt: what the model writes first is its
    thought, which ollama answers as ``message.thinking`` (``thinking`` beside a generate ``response``),
    each streamed line with its piece; it equals the OpenAI route's ``reasoning_content``."""
    path = template_path(build, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja")
    with mullama.Model.load(model_path, chat_template=path) as model, \
            serving(model, settings=ServerSettings(model_name="m"), parallel=1, n_ctx=1024) as (server, _engine):
        local = ollama.Client(host=server.url)
        whole = local.chat(model="m", messages=MESSAGES, think=True, options=GREEDY)
        reference = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused").chat.completions.create(
            model="m", messages=MESSAGES, temperature=0, max_tokens=24).choices[0].message
        assert whole.message.thinking and whole.message.thinking == reference.reasoning_content
        assert whole.message.content == (reference.content or "")
        pieces = list(local.chat(model="m", messages=MESSAGES, think=True, options=GREEDY, stream=True))
        assert "".join(piece.message.thinking or "" for piece in pieces) == whole.message.thinking
        assert "".join(piece.message.content or "" for piece in pieces) == whole.message.content
        generated = local.generate(model="m", prompt="Name a planet.", think=True, options=GREEDY)
        assert generated.thinking and "<think>" not in generated.response


def test_think_false_turns_a_thinking_templates_thought_off(build, model_path):
    """Qwen3's template closes an empty thought when enable_thinking is false: ollama's ``think: false``
    gives it that (the prompt grows by the closed thought), and no thinking comes back."""
    path = template_path(build, "Qwen-Qwen3-0.6B.jinja")
    with mullama.Model.load(model_path, chat_template=path) as model, \
            serving(model, settings=ServerSettings(model_name="m"), parallel=1, n_ctx=1024) as (server, _engine):
        local = ollama.Client(host=server.url)
        unset = local.chat(model="m", messages=MESSAGES, options={"num_predict": 2})
        off = local.chat(model="m", messages=MESSAGES, think=False, options={"num_predict": 2})
        closed = model.tokenize("<think>\n\n</think>\n\n", add_special=False, parse_special=True)
        assert off.prompt_eval_count == unset.prompt_eval_count + len(closed)
        assert not off.message.thinking


# --- context: /api/generate's conversational memory (deprecated in ollama, still sent) -------------
def test_generate_context_is_the_conversation_and_continues_it(client, served):
    """A templated /api/generate answer ends with ``context``: the prompt's tokens and the answer's; sent
    back, the next prompt continues after them (its own BOS left out), exactly as a completion of those
    tokens; a raw prompt neither returns nor reads one, as ollama's."""
    first = client.generate(model="m", prompt="My name is Ann. Say hello to me.", options=GREEDY)
    assert len(first.context) == first.prompt_eval_count + first.eval_count
    rendered = httpx.post(served.url + "/apply-template", timeout=300, json={
        "messages": [{"role": "user", "content": "My name is Ann. Say hello to me."}]}).json()["prompt"]
    spelled = httpx.post(served.url + "/detokenize", timeout=300, json={"tokens": first.context}).json()["content"]
    assert spelled.startswith(rendered + first.response)

    second = client.generate(model="m", prompt="What is my name?", context=first.context, options=GREEDY)
    rendered = httpx.post(served.url + "/apply-template", timeout=300, json={
        "messages": [{"role": "user", "content": "What is my name?"}]}).json()["prompt"]
    own = httpx.post(served.url + "/tokenize", timeout=300, json={"content": rendered}).json()["tokens"]
    assert second.prompt_eval_count == len(first.context) + len(own)
    same = httpx.post(served.url + "/v1/completions", timeout=300, json={
        "model": "m", "prompt": first.context + own, "max_tokens": 24, "temperature": 0}).json()
    assert second.response == same["choices"][0]["text"]
    streamed = list(client.generate(model="m", prompt="What is my name?", context=first.context, options=GREEDY,
                                    stream=True))
    assert "".join(part.response for part in streamed) == second.response
    assert streamed[-1].context == second.context
    assert second.context[:len(first.context) + len(own)] == first.context + own

    raw = client.generate(model="m", prompt="The capital of France is", raw=True, options=GREEDY)
    assert raw.context is None
    with_context = client.generate(model="m", prompt="The capital of France is", raw=True, options=GREEDY,
                                   context=first.context)
    assert with_context.prompt_eval_count == raw.prompt_eval_count and with_context.response == raw.response


def test_a_context_that_is_not_token_ids_is_a_400(served):
    for context, words in ((["a"], "context must be the list of token ids"), ([1.5], "context must be"),
                           ([-1], "context must be"), ({"x": 1}, "context must be"), ([10**9], "token")):
        response = httpx.post(served.url + "/api/generate", timeout=300, json={
            "model": "m", "prompt": "Hi", "context": context, "stream": False})
        assert response.status_code == 400 and words in response.json()["error"], (context, response.text)
