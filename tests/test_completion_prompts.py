"""OpenAI's ``/v1/completions`` takes ``prompt`` as a string, a list of token ids, or a list of several
of either (its spec; llama-server takes the same): each prompt gets ``n`` choices, choice ``i * n + j``
being prompt i's j-th, and the usage counts every prompt. The official client and LangChain's ``OpenAI``
LLM (whose ``batch`` sends its prompts in one request) against the real server, each answer compared
with llama-server's for the same prompt."""

from __future__ import annotations

import openai
import pytest
from langchain_openai import OpenAI as LangChainOpenAI

PROMPTS = ["The capital of France is", "Count: 1, 2, 3,", "def add(a, b):"]
GREEDY = {"max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def upstream(llama_server):
    """llama-server's greedy answer to each prompt, one request each, no prompt cache."""
    return [llama_server.post("/v1/completions", {"prompt": prompt, **GREEDY, "cache_prompt": False})
            for prompt in PROMPTS]


@pytest.fixture(scope="module")
def upstream_texts(upstream):
    return [answer["choices"][0]["text"] for answer in upstream]


@pytest.fixture(scope="module")
def prompt_ids(llama_server):
    """Each prompt's token ids as llama-server reads the text (its BOS included when the model adds one)."""
    return [llama_server.post("/tokenize", {"content": prompt, "add_special": True})["tokens"] for prompt in PROMPTS]


def test_several_text_prompts_answer_each_in_order(client, upstream, upstream_texts, prompt_ids):
    reply = client.completions.create(model="m", prompt=PROMPTS, **GREEDY)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert [choice.text for choice in reply.choices] == upstream_texts
    assert reply.usage.prompt_tokens == sum(len(ids) for ids in prompt_ids) \
        == sum(answer["usage"]["prompt_tokens"] for answer in upstream)
    assert reply.usage.completion_tokens == sum(answer["usage"]["completion_tokens"] for answer in upstream)


def test_token_id_prompts_answer_as_their_text_does(client, upstream_texts, prompt_ids):
    one = client.completions.create(model="m", prompt=prompt_ids[0], **GREEDY)
    assert one.choices[0].text == upstream_texts[0]
    assert one.usage.prompt_tokens == len(prompt_ids[0])
    several = client.completions.create(model="m", prompt=prompt_ids, **GREEDY)
    assert [choice.text for choice in several.choices] == upstream_texts


def test_token_ids_answer_as_llama_server_answers_them(client, llama_server, prompt_ids):
    ids = prompt_ids[1][1:] if len(prompt_ids[1]) > 1 else prompt_ids[1]  # without the BOS: taken as sent
    upstream = llama_server.post("/v1/completions", {"prompt": ids, **GREEDY, "cache_prompt": False})
    ours = client.completions.create(model="m", prompt=ids, **GREEDY)
    assert ours.choices[0].text == upstream["choices"][0]["text"]
    assert ours.usage.prompt_tokens == upstream["usage"]["prompt_tokens"] == len(ids)


def test_choices_of_several_prompts_stream_by_index(client):
    request = {"model": "m", "prompt": PROMPTS[:2], "n": 2, "max_tokens": 10, "temperature": 0.8, "seed": 7}
    whole = client.completions.create(**request)
    assert [choice.index for choice in whole.choices] == [0, 1, 2, 3]
    streamed = {index: "" for index in range(4)}
    finished = set()
    for chunk in client.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
        if chunk.usage is not None:
            usage = chunk.usage
    assert finished == {0, 1, 2, 3}
    assert [streamed[index] for index in range(4)] == [choice.text for choice in whole.choices]
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_langchains_openai_llm_batches_its_prompts_in_one_request(served, upstream_texts):
    llm = LangChainOpenAI(base_url=f"{served.url}/v1", api_key="unused", model="m", max_tokens=12, temperature=0)
    assert llm.batch(PROMPTS) == upstream_texts
    assert llm.invoke(PROMPTS[0]) == upstream_texts[0]
    assert "".join(llm.stream(PROMPTS[2])) == upstream_texts[2]


@pytest.mark.parametrize(("prompt", "words"), [
    ([], "non-empty string, a list of token ids"),
    (["a", 5], "non-empty string, a list of token ids"),
    ([[1, 2], []], "non-empty string, a list of token ids"),
    ([True, 2], "non-empty string, a list of token ids"),
    ([1, 10**9], "token id 1000000000 is out of range"),
    (["a"] * 33, "make 66 sequences; one request may start at most 64"),
])
def test_a_prompt_that_is_none_of_these_is_refused_by_name(client, prompt, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="m", prompt=prompt, max_tokens=4, n=2 if len(prompt) == 33 else 1)
    assert caught.value.status_code == 400 and words in caught.value.message
    assert caught.value.body["param"] == "prompt"
