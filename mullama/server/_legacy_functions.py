"""OpenAI's deprecated function calling on ``/v1/chat/completions``: ``functions``, ``function_call``,
an assistant message's ``function_call`` and ``role: "function"`` results.

OpenAI still answers it, and code written before tools sends it (LangChain's ``bind(functions=...)``
with its ``JsonOutputFunctionsParser``, the openai SDK's ``functions=`` argument). A request in this
form becomes a tools request, with one call at most (the form has no parallel calls), and the answer's
call is written back in the same form: ``message.function_call`` (``delta.function_call`` when
streamed, ``_openai_shapes.function_call_delta``) and the finish reason ``function_call``.
llama-server refuses these fields; OpenAI's reference is what is followed here.
"""

from __future__ import annotations

from typing import Any

from ._request import bad

__all__ = ["LEGACY_FIELDS", "legacy_finish", "legacy_messages", "legacy_request"]

LEGACY_FIELDS = frozenset({"functions", "function_call"})


def legacy_request(body: dict) -> tuple[list[dict], Any] | None:
    """The tools and tool_choice a request's ``functions`` and ``function_call`` stand for (None when it
    has neither): each function as a function tool; ``function_call`` "auto", "none" or
    ``{"name": ...}`` as the same tool_choice."""
    functions, choice = body.get("functions"), body.get("function_call")
    if functions is None and choice is None:
        return None
    if body.get("tools") is not None or body.get("tool_choice") is not None:
        raise bad("Use either 'tools' and 'tool_choice' or the deprecated 'functions' and 'function_call', "
                  "not both.", "functions")
    if not isinstance(functions, list) or not functions:
        raise bad("'function_call' needs 'functions'." if functions is None else
                  "'functions' must be a non-empty list of {name, description, parameters} objects.", "functions")
    tools = []
    for i, function in enumerate(functions):
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad(f"functions[{i}] must be an object with a 'name' string (and 'description', 'parameters').",
                      "functions")
        tools.append({"type": "function", "function": function})
    if choice is None or choice in ("auto", "none"):
        return tools, choice or "auto"
    if isinstance(choice, dict) and isinstance(choice.get("name"), str) and set(choice) == {"name"}:
        return tools, {"type": "function", "function": {"name": choice["name"]}}
    raise bad("'function_call' must be 'auto', 'none' or {\"name\": \"my_function\"}.", "function_call")


def legacy_messages(messages: list) -> list:
    """A conversation in the deprecated form as one with tool calls: an assistant message's
    ``function_call`` becomes its one tool call, and the ``role: "function"`` message after it that
    call's ``tool`` result (matched by order: the form has no call ids)."""
    converted: list = []
    call_id: str | None = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            converted.append(message)  # the template's checks say what is wrong with it
            continue
        call = message.get("function_call")
        if message.get("role") == "assistant" and call is not None:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise bad(f"messages[{i}].function_call must be {{\"name\": ..., \"arguments\": \"...\"}}.",
                          "messages")
            call_id = f"call_{i}"
            rest = {key: value for key, value in message.items() if key != "function_call"}
            converted.append({**rest, "tool_calls": [{"id": call_id, "type": "function", "function": {
                "name": call["name"], "arguments": call.get("arguments") or "{}"}}]})
        elif message.get("role") == "function":
            result = {"role": "tool", "content": message.get("content")}
            if isinstance(message.get("name"), str):
                result["name"] = message["name"]
            if call_id is not None:
                result["tool_call_id"] = call_id
                call_id = None
            converted.append(result)
        else:
            converted.append(message)
    return converted


def legacy_finish(reason: str) -> str:
    """The finish reason in the deprecated form: ``function_call`` where tools say ``tool_calls``."""
    return "function_call" if reason == "tool_calls" else reason
