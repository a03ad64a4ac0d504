"""The tokenizer and template over HTTP: llama-server's ``/tokenize``, ``/detokenize``, ``/apply-template``
and ``/props`` answer as llama-server's do on the same model (compared live), and vLLM's shapes
(``/tokenizer_info``, ``/tokenize`` with a ``prompt``) as lm-eval's remote tokenizer reads them; a chat
request's ``chat_template_kwargs`` reach the template as llama-server's do."""

from __future__ import annotations

import httpx
import openai
import pytest
import upstream
from inprocess_server import serving
from upstream import template_path

import mullama
from mullama.generate._context import default_threads

TEXTS = ["Hello world", " leading space and <|im_start|> a special token", "héllo 🦙 naïve 日本語", "a\n\n\tb"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def _post(base: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{base}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("options", [{}, {"add_special": True}, {"parse_special": False}, {"with_pieces": True},
                                     {"add_special": True, "with_pieces": True, "parse_special": False}])
def test_tokenize_answers_as_llama_server(served, llama_server, options):
    for text in TEXTS:
        body = {"content": text, **options}
        assert _post(served.url, "/tokenize", body) == llama_server.post("/tokenize", body), (text, options)


def test_a_piece_that_is_not_whole_utf8_is_its_bytes(served, llama_server):
    body = {"content": "🦙", "with_pieces": True}
    ours = _post(served.url, "/tokenize", body)
    assert any(isinstance(token["piece"], list) for token in ours["tokens"])  # the llama's bytes are split
    assert ours == llama_server.post("/tokenize", body)


def test_mixed_content_and_detokenize_answer_as_llama_server(served, llama_server):
    body = {"content": ["Hello", 28, " world", 1], "add_special": True}
    tokens = _post(served.url, "/tokenize", body)["tokens"]
    assert tokens == llama_server.post("/tokenize", body)["tokens"]
    for text in TEXTS:
        ids = llama_server.post("/tokenize", {"content": text, "add_special": True})["tokens"]
        ours = _post(served.url, "/detokenize", {"tokens": ids})
        assert ours["content"] == llama_server.post("/detokenize", {"tokens": ids})["content"]
        assert ours["prompt"] == ours["content"]  # vLLM's name for it


def test_apply_template_and_props_answer_as_llama_server(served, llama_server):
    assert _post(served.url, "/apply-template", {"messages": CHAT}) == \
        llama_server.post("/apply-template", {"messages": CHAT})
    ours = httpx.get(f"{served.url}/props", timeout=60).json()
    with httpx.Client() as client:
        theirs = client.get(f"{llama_server.url}/props", timeout=60).json()
    for key in ("chat_template", "bos_token", "eos_token", "modalities"):
        assert ours[key] == theirs[key], key
    assert ours["total_slots"] == 2 and ours["default_generation_settings"]["n_ctx"] == 2048  # per slot
    assert ours["model_alias"] == "smollm2:135m"


def test_vllms_tokenizer_routes_serve_lm_evals_remote_tokenizer(served, model):
    """What lm-eval's RemoteTokenizer asks (tokenizer_backend "auto" probes for it): GET /tokenizer_info
    with an eos_token, then POST /tokenize {"prompt", "add_special_tokens": false} and /detokenize."""
    info = httpx.get(f"{served.url}/tokenizer_info", timeout=60).json()
    assert info["eos_token"] == "<|im_end|>" and info["chat_template"] == model.chat_template
    assert info["model_max_length"] == 2048
    eos = _post(served.url, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False})
    assert eos["tokens"] == [model.eos_token_id] and eos["count"] == 1 and eos["max_model_len"] == 2048
    text = "The capital of France is Paris."
    plain = _post(served.url, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True})
    assert plain["tokens"] == model.tokenize(text, add_special=False)
    assert "".join(plain["token_strs"]) == text
    assert _post(served.url, "/detokenize", {"tokens": plain["tokens"]})["prompt"] == text
    chat = _post(served.url, "/tokenize", {"messages": CHAT})
    assert chat["tokens"] == model.tokenize(model.apply_chat_template(CHAT), add_special=False, parse_special=True)


@pytest.mark.parametrize(("path", "body", "words"), [
    ("/tokenize", {"content": 5}, "must be a string or a list of strings and token ids"),
    ("/tokenize", {"content": ["a", 10**9]}, "out of range"),
    ("/tokenize", {"prompt": ["a"]}, "\"prompt\" must be a string"),
    ("/detokenize", {"tokens": ["a"]}, "must be a list of token ids"),
    ("/detokenize", {"tokens": [-1]}, "out of range"),
    ("/apply-template", {"messages": "hi"}, "'messages' must be a non-empty list"),
])
def test_bad_bodies_are_refused_by_name(served, path, body, words):
    response = httpx.post(f"{served.url}{path}", json=body, timeout=60)
    assert response.status_code == 400 and words in response.json()["error"]["message"], response.text


@pytest.fixture(scope="module")
def qwen3(build, model_path):
    """Our server and llama-server on the default model with the Qwen3 template (which thinks unless told not)."""
    path = template_path(build, "Qwen-Qwen3-0.6B.jinja")
    theirs = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(),
                                  extra=("--jinja", "--chat-template-file", str(path)))
    try:
        with mullama.Model.load(model_path, chat_template=path) as model, serving(model, n_ctx=2048) as (ours, _):
            yield ours, theirs
    finally:
        theirs.close()


def test_chat_template_kwargs_reach_the_template_as_llama_servers_do(qwen3):
    ours, theirs = qwen3
    body = {"messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}}
    prompt = _post(ours.url, "/apply-template", body)["prompt"]
    assert prompt.endswith("<think>\n\n</think>\n\n") and prompt == theirs.post("/apply-template", body)["prompt"]
    client = openai.OpenAI(base_url=f"{ours.url}/v1", api_key="unused")
    request = {"model": "m", "messages": CHAT, "max_tokens": 8, "temperature": 0,
               "extra_body": {"chat_template_kwargs": {"enable_thinking": False}}}
    answer = client.chat.completions.create(**request)
    reference = theirs.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 8, "temperature": 0,
                                                     "cache_prompt": False,
                                                     "chat_template_kwargs": {"enable_thinking": False}})
    assert answer.choices[0].message.content == reference["choices"][0]["message"]["content"]
    assert answer.usage.prompt_tokens == reference["usage"]["prompt_tokens"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{**request, "extra_body": {"chat_template_kwargs": {"messages": []}}})
    assert "chat_template_kwargs cannot set messages" in caught.value.message
    assert caught.value.body["param"] == "chat_template_kwargs"
