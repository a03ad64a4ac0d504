"""Each wire format owns its shapes: every route declares its format (which the --rpc supervisor asks
for, instead of guessing from the path), and tool calls reach each format as neutral events. No model
is loaded here."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from starlette.routing import Route

import mullama.server
from mullama.server._anthropic import ANTHROPIC
from mullama.server._app import ROUTES, route_format
from mullama.server._http import declared_format
from mullama.server._infill import LLAMA_SERVER
from mullama.server._ollama import OLLAMA
from mullama.server._openai_shapes import OPENAI, tool_call_delta
from mullama.server._supervisor import _error_event, _error_response
from mullama.server._tool_calls import CallArguments, CallStart, ToolCallProgress

SERVER = Path(mullama.server.__file__).resolve().parent
UNSHAPED = {"/health", "/health/ready", "/health/live"}  # no errors to shape (the supervisor answers them itself)


def _expected(path: str):
    # llama-server's own routes (/infill, /rerank and its aliases, /slots, /lora-adapters, the tokenizer's and
    # template's, /props), in its error shape
    own = path in ("/infill", "/lora-adapters", "/tokenize", "/detokenize", "/apply-template", "/props",
                   "/tokenizer_info") or path.startswith("/slots")
    if own or path.removeprefix("/v1").startswith("/rerank"):
        return LLAMA_SERVER
    if path.startswith("/v1/messages"):
        return ANTHROPIC
    return OLLAMA if path.startswith("/api/") else OPENAI


def test_every_route_declares_its_wire_format():
    for route in ROUTES:
        if not isinstance(route, Route) or route.path in UNSHAPED:
            continue
        assert declared_format(route.endpoint) is _expected(route.path), route.path
        assert route_format(route.path) is _expected(route.path), route.path


def test_a_path_no_route_has_is_answered_as_the_app_answers_it():
    assert route_format("/v1/nothing") is OPENAI
    assert route_format("/api/create") is OLLAMA  # ollama's clients read {"error": ...}


@pytest.mark.parametrize(("path", "event", "body"), [
    ("/v1/chat/completions",
     b'\n\ndata: {"error": {"message": "gone", "type": "server_error", "param": null, "code": "generation_error"}}\n\n',
     b'{"error":{"message":"wait","type":"server_error","param":null,"code":"worker_restarting"}}'),
    ("/v1/responses",
     b'\n\ndata: {"error": {"message": "gone", "type": "server_error", "param": null, "code": "generation_error"}}\n\n',
     b'{"error":{"message":"wait","type":"server_error","param":null,"code":"worker_restarting"}}'),
    ("/v1/messages",
     b'\n\nevent: error\ndata: {"type": "error", "error": {"type": "api_error", "message": "gone"}}\n\n',
     b'{"type":"error","error":{"type":"overloaded_error","message":"wait"}}'),
    ("/api/chat", b'{"error": "gone"}\n', b'{"error":"wait"}'),
    ("/api/version", b'{"error": "gone"}\n', b'{"error":"wait"}'),
])
def test_the_supervisor_answers_in_the_routes_own_format(path, event, body):
    assert _error_event(path, "gone") == event
    response = _error_response(path, 503, "wait", "worker_restarting")
    assert response.status_code == 503 and response.body == body and response.headers["retry-after"] == "2"


@dataclass
class _Call:
    name: str
    arguments: str
    id: str | None = None


@dataclass
class _Parser:
    """What ToolCallProgress reads of a ToolCallParser."""

    calls: list[_Call] = field(default_factory=list)
    in_call: bool = False
    name: str | None = None
    arguments: str = ""


def test_tool_calls_are_neutral_events_that_openai_turns_into_its_deltas():
    progress, parser = ToolCallProgress(), _Parser()
    assert progress.after(parser) == []
    parser.in_call, parser.name, parser.arguments = True, "get_weather", '{"city": '
    started, first = progress.after(parser)
    assert isinstance(started, CallStart) and started.index == 0 and started.name == "get_weather"
    assert started.id.startswith("call_") and first == CallArguments(0, '{"city": ')
    parser.calls.append(_Call("get_weather", '{"city": "Paris"}', "call_given"))
    parser.in_call, parser.name, parser.arguments = False, None, ""
    assert progress.after(parser) == [CallArguments(0, '"Paris"}')]
    parser.calls.append(_Call("get_time", "{}", "call_two"))
    events = progress.after(parser)
    assert events == [CallStart(1, "call_two", "get_time"), CallArguments(1, "{}")]
    assert [tool_call_delta(event) for event in events] == [
        {"index": 1, "id": "call_two", "type": "function", "function": {"name": "get_time", "arguments": ""}},
        {"index": 1, "function": {"arguments": "{}"}}]


def _imported(module: str) -> set[str]:
    tree = ast.parse((SERVER / f"{module}.py").read_text(encoding="utf-8"))
    return {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


def test_no_wire_format_reads_another_formats_shapes():
    assert not _imported("_anthropic") & {"_openai", "_openai_shapes", "_ollama", "_responses"}
    assert not _imported("_ollama") & {"_openai", "_openai_shapes", "_anthropic", "_responses"}
    assert not _imported("_infill") & {"_openai", "_openai_shapes", "_anthropic", "_ollama", "_responses"}
    assert not _imported("_rerank") & {"_openai", "_openai_shapes", "_anthropic", "_ollama", "_responses"}
    assert not _imported("_request") & {"_openai", "_openai_shapes", "_anthropic", "_ollama", "_responses"}
    assert not _imported("_supervisor") & {"_openai", "_openai_shapes", "_anthropic", "_ollama", "_responses"}
