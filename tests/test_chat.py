"""Chat templates: our rendering equals upstream's, and hostile templates fail safely."""

from __future__ import annotations

import pytest

import mullama

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And times 3?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of Japan? 日本"},
     {"role": "assistant", "content": "Tokyo 🗼"}, {"role": "user", "content": "Population?"}],
    [{"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_rendering_equals_upstream_apply_template(messages, model, llama_server):
    expected = llama_server.post("/apply-template", {"messages": messages})["prompt"]
    assert model.apply_chat_template(messages, add_generation_prompt=True) == expected


def test_chat_stream_equals_upstream_chat_completion(context, model, llama_server):
    messages = CONVERSATIONS[2]
    prompt = llama_server.post("/apply-template", {"messages": messages})["prompt"]
    reference = llama_server.greedy(prompt, 32)
    tokens = list(context.chat_stream(messages, max_tokens=32, temperature=0))
    assert [t.id for t in tokens] == reference["tokens"]
    assert "".join(t.text for t in tokens) == reference["content"]


def test_follow_up_turns_reuse_the_cache(context, model):
    messages = [{"role": "user", "content": "Name a fruit."}]
    reply = context.chat_stream(messages, max_tokens=16, temperature=0)
    text = "".join(t.text for t in reply)
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Another one?"}]
    follow_up = context.chat_stream(messages, max_tokens=8, temperature=0)
    list(follow_up)
    prompt = model.tokenize(model.apply_chat_template(messages), parse_special=True)
    assert follow_up.cached_tokens > len(prompt) // 2


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__init__.__globals__ }}",
    "{% set x = messages.append(1) %}{{ x }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ raise_exception('no system messages allowed') }}",
    "{% for i in range(10**9) %}{{ i }}{% endfor %}",
    "{{ 'x' * 100000000 }}",
    "{% if %}",
    "{{ undefined_function() }}",
])
def test_hostile_or_broken_templates_fail_safely(model, template):
    with pytest.raises(mullama.TemplateError) as info:
        model.apply_chat_template([{"role": "user", "content": "hi"}], template=template)
    assert info.value.code == "TEMPLATE_ERROR"


@pytest.mark.parametrize("messages", [[], "hi", [{"content": "no role"}], [{"role": "user", "content": 5}],
                                      [{"role": "user", "content": [{"type": "image_url"}]}], [None]])
def test_bad_messages(model, messages):
    with pytest.raises(mullama.TemplateError):
        model.apply_chat_template(messages)


def test_unknown_roles_are_refused_by_name(model):
    with pytest.raises(mullama.InvalidConfigError) as info:
        model.apply_chat_template([{"role": "wizard", "content": "Hi"}])
    assert "wizard" in str(info.value) and info.value.code == "INVALID_CONFIG"


@pytest.mark.parametrize("messages, where", [
    ([{"role": "user"}], "messages[0] (user)"),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": None}], "messages[1] (user)"),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], "messages[1] (assistant)"),
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "call_1"}], "messages[1] (tool)"),
])
def test_a_message_without_content_is_refused_by_index(model, context, messages, where):
    """Not the template's TypeError: INVALID_CONFIG, naming the message and what to send."""
    with pytest.raises(mullama.InvalidConfigError) as info:
        model.apply_chat_template(messages)
    assert info.value.code == "INVALID_CONFIG"
    assert f"{where} has no content" in str(info.value) and "'content': '...'" in str(info.value)
    with pytest.raises(mullama.InvalidConfigError):
        context.chat_stream(messages, max_tokens=2)


def test_an_assistant_message_with_tool_calls_needs_no_content(model):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    question = {"role": "user", "content": "Weather in Paris?"}
    answer = {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    for assistant in ({"role": "assistant", "tool_calls": [call]},
                      {"role": "assistant", "content": None, "tool_calls": [call]}):
        assert "sunny" in model.apply_chat_template([question, assistant, answer])
