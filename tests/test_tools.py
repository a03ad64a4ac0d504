"""Tool calling on the real default model with upstream's own tool-use templates (llama.cpp's
models/templates, as `llama-server --jinja --chat-template-file` takes them): rendering equals
llama-server's, "auto" answers equal llama-server's, "required" and named calls follow OpenAI's
meaning, and the server streams calls that the official openai client assembles."""

from __future__ import annotations

import json

import jsonschema
import pytest
import upstream
from inprocess_server import serving
from upstream import template_path

import mullama
from mullama.chat._tools import _is_json
from mullama.generate._context import default_threads
from mullama.server import ServerSettings

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
TOOLS = [WEATHER, TIME]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
CALLED = [*QUESTION,
          {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
              "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees celsius, sunny"}]


@pytest.fixture(scope="module")
def qwen_model(model_path, qwen_template):
    with mullama.Model.load(model_path, chat_template=qwen_template) as loaded:
        yield loaded


def validate(call, tools=TOOLS) -> dict:
    tool = next(t for t in tools if t["function"]["name"] == call.name)
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


# --- rendering ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Qwen-Qwen2.5-7B-Instruct.jinja",
                                  "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
                                  "meta-llama-Llama-3.2-3B-Instruct.jinja"])
def test_tools_and_tool_results_render_as_llama_server_renders_them(name, build, model_path, model):
    path = template_path(build, name)
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(),
                                  extra=("--jinja", "--chat-template-file", str(path)))
    try:
        for messages, tools in ((QUESTION, TOOLS), (CALLED, TOOLS), (CALLED, None)):
            body = {"messages": messages, **({"tools": tools} if tools else {})}
            expected = server.post("/apply-template", body)["prompt"]
            assert model.apply_chat_template(messages, template=path, tools=tools) == expected, (name, messages)
    finally:
        server.close()


def test_a_template_that_refuses_the_messages_is_a_template_error(build, model):
    # Mistral Nemo wants 9-character call ids; llama-server answers 400 for this conversation too.
    path = template_path(build, "mistralai-Mistral-Nemo-Instruct-2407.jinja")
    with pytest.raises(mullama.TemplateError, match="Tool call IDs"):
        model.apply_chat_template(CALLED, template=path, tools=TOOLS)


# --- Python: required, named, auto -------------------------------------------------------------------
FORMATS = ["Qwen-Qwen2.5-7B-Instruct.jinja", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
           "meta-llama-Llama-3.2-3B-Instruct.jinja", "mistralai-Mistral-Nemo-Instruct-2407.jinja"]


@pytest.mark.parametrize("name", FORMATS)
def test_required_makes_a_valid_call_in_every_format_and_the_loop_goes_on(name, build, model_path):
    """OpenAI's meaning of "required": a call, valid under its schema, nothing else (llama-server does
    not force one on this model); then the tool's result goes back through the template."""
    with mullama.Model.load(model_path, chat_template=template_path(build, name)) as loaded, \
            mullama.Context(loaded, n_ctx=4096) as context:
        stream = context.chat_stream(QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                                     max_tokens=120, temperature=0)
        tokens = list(stream)
        assert stream.finish_reason == "tool_calls", stream.finish_reason
        (call,) = stream.tool_calls
        validate(call)
        assert stream.text == "" and all(t.text == "" for t in tokens)
        assert "tool_call" in {t.kind for t in tokens}
        history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
                   {"role": "tool", "tool_call_id": call.id, "content": "18 degrees celsius, sunny"}]
        answer = context.chat_stream(history, tools=TOOLS, max_tokens=24, temperature=0)
        list(answer)  # the template takes the call back (Mistral's wants 9-character ids: it gets them)
        assert answer.finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("name", [FORMATS[0], FORMATS[2]])
def test_a_named_function_is_the_one_called(name, build, model_path):
    with mullama.Model.load(model_path, chat_template=template_path(build, name)) as loaded, \
            mullama.Context(loaded, n_ctx=4096) as context:
        stream = context.chat_stream(QUESTION, tools=TOOLS, max_tokens=120, temperature=0,
                                     tool_choice={"type": "function", "function": {"name": "get_time"}})
        list(stream)
    (call,) = stream.tool_calls
    assert call.name == "get_time" and stream.finish_reason == "tool_calls"
    validate(call)


@pytest.mark.parametrize("name, messages", [
    (FORMATS[0], QUESTION), (FORMATS[0], CALLED), (FORMATS[1], QUESTION), (FORMATS[1], CALLED),
    (FORMATS[2], QUESTION), (FORMATS[2], CALLED), (FORMATS[3], QUESTION)],
    ids=["qwen", "qwen-result", "hermes", "hermes-result", "llama", "llama-result", "mistral"])
def test_auto_answers_equal_llama_server(name, messages, build, model_path):
    path = template_path(build, name) if name else None
    extra = ("--jinja", "--chat-template-file", str(path)) if path else ("--jinja",)
    server = upstream.LlamaServer(build.tool("llama-server"), model_path, threads=default_threads(), extra=extra)
    try:
        reference = server.post("/v1/chat/completions", {
            "messages": messages, "tools": TOOLS, "max_tokens": 48, "temperature": 0, "cache_prompt": False})
    finally:
        server.close()
    message = reference["choices"][0]["message"]
    with mullama.Model.load(model_path, chat_template=path) as loaded, mullama.Context(loaded, n_ctx=4096) as context:
        stream = context.chat_stream(messages, tools=TOOLS, max_tokens=48, temperature=0)
        list(stream)
    assert stream.text == (message.get("content") or "")
    # A call cut short by max_tokens: llama-server returns what it has of it, arguments not JSON;
    # mullama keeps whole calls only (finish_reason "length" says the answer was cut).
    complete = [c for c in message.get("tool_calls") or [] if _is_json(c["function"]["arguments"])]
    assert [(c.name, json.loads(c.arguments)) for c in stream.tool_calls] == [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in complete]
    if len(complete) < len(message.get("tool_calls") or []):
        assert stream.finish_reason == reference["choices"][0]["finish_reason"] == "length"


def test_tool_mistakes_are_invalid_config(qwen_model, model):
    with mullama.Context(qwen_model, n_ctx=1024) as context:
        with pytest.raises(mullama.InvalidConfigError, match="not among the tools"):
            context.chat_stream(QUESTION, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "x"}})
        with pytest.raises(mullama.InvalidConfigError, match="tools\\[0\\]"):
            context.chat_stream(QUESTION, tools=[{"type": "function", "function": {"name": "bad name!"}}])
        with pytest.raises(mullama.InvalidConfigError, match="grammar cannot be combined with tools"):
            context.chat_stream(QUESTION, tools=TOOLS, grammar='root ::= "x"')


def test_a_forced_call_with_a_template_that_describes_no_tools(model):
    """SmolLM2's own template ignores tools: a forced call describes them in the system message and
    is one JSON object, valid under the tool's schema."""
    with mullama.Context(model, n_ctx=2048) as context:
        stream = context.chat_stream(QUESTION, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0)
        list(stream)
    assert stream.finish_reason == "tool_calls" and stream.text == ""
    (call,) = stream.tool_calls
    validate(call)
    prompt = model.apply_chat_template(QUESTION, tools=TOOLS)
    assert "get_weather" not in prompt  # the template itself did not describe them


def test_tools_under_auto_reach_a_template_that_describes_none_unlike_llama_server(model, llama_server):
    """Upstream at our pin leaves the tools out of SmolLM2's prompt (its template has no tools section),
    so under "auto" the model cannot know they exist; OpenAI's meaning is that a model given tools is
    told about them. We follow the API: the system message describes them (and llama-server differs)."""
    def upstream_prompt_tokens(**fields) -> int:
        return llama_server.post("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 1, "temperature": 0,
                                                          **fields})["usage"]["prompt_tokens"]

    assert upstream_prompt_tokens(tools=TOOLS) == upstream_prompt_tokens()
    with mullama.Context(model, n_ctx=2048) as context:
        plain = context.chat_stream(QUESTION, max_tokens=1, temperature=0)
        list(plain)
        told = context.chat_stream(QUESTION, tools=TOOLS, max_tokens=48, temperature=0)
        list(told)
    assert told.prompt_tokens > plain.prompt_tokens + 40
    assert told.prompt_tokens > upstream_prompt_tokens(tools=TOOLS)
    # The answer is text, or a call: never a call left in the text.
    assert told.tool_calls or not told.text.lstrip().startswith("{")
    for call in told.tool_calls:
        validate(call)


def test_a_json_answer_beside_tools_is_content_and_a_call_is_a_call(model):
    """Tools and a json_schema together (the Responses API's text.format beside tools): the grammar
    allows a call or the JSON; a JSON answer is the content, not a call."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "summary": {"type": "string"}},
              "required": ["city", "summary"]}
    with mullama.Context(model, n_ctx=2048) as context:
        stream = context.chat_stream([{"role": "user", "content": "Summarise the weather in Paris in JSON."}],
                                     tools=TOOLS, json_schema=schema, max_tokens=120, temperature=0)
        pieces = [token.text for token in stream]
    assert stream.finish_reason in ("stop", "tool_calls")
    if stream.tool_calls:
        assert stream.text == "" and stream.finish_reason == "tool_calls"
        validate(stream.tool_calls[0])
    else:
        jsonschema.validate(json.loads(stream.text), schema)
        assert "".join(pieces) == stream.text


def test_the_call_formats_are_recognised_from_the_templates(build):
    from mullama.chat._tools import HERMES, LLAMA3, MISTRAL, call_format

    found = [call_format(template_path(build, name).read_text()) for name in FORMATS]
    assert found == [HERMES, HERMES, LLAMA3, MISTRAL]
    assert call_format(template_path(build, "google-gemma-2-2b-it.jinja").read_text()) is None


# --- the server and the openai client ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tool_server(qwen_model):
    with serving(qwen_model, settings=ServerSettings(model_name="smollm2-qwen-template"), parallel=2,
                 n_ctx=4096) as (server, _engine):
        yield server


def test_openai_client_required_call_streamed_and_not(tool_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused")
    options = {"model": "m", "messages": QUESTION, "tools": TOOLS, "tool_choice": "required",
               "parallel_tool_calls": False, "temperature": 0, "max_tokens": 120}
    whole = client.chat.completions.create(**options)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    with client.beta.chat.completions.stream(**options) as stream:  # the client's helper assembles deltas
        for _ in stream:
            pass
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    (streamed_call,) = streamed.message.tool_calls
    assert streamed_call.function.name == "get_weather"
    assert json.loads(streamed_call.function.arguments) == arguments
    assert not streamed.message.content


def test_a_full_tool_loop_over_http(tool_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{tool_server.url}/v1", api_key="unused")
    messages = list(QUESTION)
    first = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, temperature=0, max_tokens=120,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 degrees celsius, sunny"})
    answer = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, temperature=0, max_tokens=40)
    assert answer.choices[0].message.content  # the model answers from the tool's result
    assert answer.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, param", [
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": TOOLS, "grammar": 'root ::= "x"'}, "tools"),  # a json_schema may go with tools, a grammar not
])
def test_bad_tool_requests_are_400s(tool_server, body, param):
    import httpx

    response = httpx.post(f"{tool_server.url}/v1/chat/completions",
                          json={"messages": QUESTION, "max_tokens": 8, **body}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_langchain_bind_tools_round_trip(tool_server):
    """LangChain's ChatOpenAI pointed at our server: bind_tools, a forced call, the tool's result
    sent back as a ToolMessage, and a final answer."""
    import langchain_openai  # the test extra installs it: a missing package fails the test, never skips it
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"18 degrees celsius and sunny in {city}"

    chat = langchain_openai.ChatOpenAI(base_url=f"{tool_server.url}/v1", api_key="unused", model="m",
                                       temperature=0, max_tokens=80)
    messages = [HumanMessage("What is the weather in Paris?")]
    first = chat.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    messages += [first, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    final = chat.bind_tools([get_weather]).invoke(messages)
    assert final.content and not final.tool_calls


def test_async_streams_call_tools_too(qwen_model):
    import asyncio

    async def main():
        async_model = mullama.AsyncModel(qwen_model, parallel=2, n_ctx=2048)
        try:
            streams = [async_model.chat_stream(QUESTION, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
                                               max_tokens=100, temperature=0)
                       for choice in ("required", {"type": "function", "function": {"name": "get_time"}})]
            for stream in streams:
                async for _ in stream:
                    pass
            return streams
        finally:
            engine = async_model.engine
            if engine is not None:
                await asyncio.to_thread(engine.close)

    required, named = asyncio.run(main())
    assert required.finish_reason == named.finish_reason == "tool_calls"
    assert required.tool_calls[0].name == "get_weather" and named.tool_calls[0].name == "get_time"


def test_run_takes_a_chat_template_file(model_path, qwen_template, qwen_model):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "mullama", "run", str(model_path), "--chat-template-file",
                             str(qwen_template), "--temp", "0", "-n", "4", "--json", "Hi"],
                            capture_output=True, text=True, timeout=300, check=False)
    plain = subprocess.run([sys.executable, "-m", "mullama", "run", str(model_path), "--temp", "0", "-n", "4",
                            "--json", "Hi"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == plain.returncode == 0, result.stderr + plain.stderr
    expected = qwen_model.tokenize(qwen_model.apply_chat_template([{"role": "user", "content": "Hi"}]),
                                   add_special=True, parse_special=True)
    assert json.loads(result.stdout)["prompt_tokens"] == len(expected)
    assert json.loads(plain.stdout)["prompt_tokens"] != len(expected)
