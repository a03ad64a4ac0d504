"""Chat templates: the model's own Jinja template, rendered as upstream renders it.

Messages are checked and normalised here (roles, text parts); the template itself runs in
the sandbox of ``_sandbox`` (jinja2's, with resource limits), because templates come
from model files, which may be hostile.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .._exceptions import InvalidConfigError, TemplateError
from ._media_parts import MEDIA_MARKER_PART, MEDIA_PART_TYPES
from ._sandbox import render

__all__ = ["ROLES", "load_template", "normalize_messages", "render_chat_template"]

# The roles OpenAI's chat API accepts ("developer" is its newer name for "system").
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _content_text(content: Any, index: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        # As llama.cpp joins parts: text parts with a newline, none before or after a media marker
        # (what an image or audio part became: see mullama.chat._media_parts).
        text, after_marker = "", False
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in ("text", MEDIA_MARKER_PART) or not isinstance(part.get("text"), str):
                hint = (" (images and audio need a model loaded with a projector: Model.load(..., mmproj=...))"
                        if kind in MEDIA_PART_TYPES else "")
                raise TemplateError(f"messages[{index}].content: only text parts "
                                    f"({{'type': 'text', 'text': ...}}) are supported here{hint}.")
            if kind == "text" and text and not after_marker:
                text += "\n"
            text += part["text"]
            after_marker = kind == MEDIA_MARKER_PART
        return text
    raise TemplateError(f"messages[{index}].content must be a string or a list of text parts.")


def _tool_calls(calls: Any, index: int, object_arguments: bool) -> list[dict]:
    """An assistant message's ``tool_calls`` (OpenAI's shape), checked; ``arguments`` given as a JSON
    string become an object for templates that render them as one (llama.cpp does the same)."""
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise TemplateError(f"messages[{index}].tool_calls must be a list of tool calls.")
    result = []
    for number, call in enumerate(calls):
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise TemplateError(f"messages[{index}].tool_calls[{number}] needs a function with a name: "
                                "{'type': 'function', 'function': {'name': ..., 'arguments': '{...}'}}.")
        arguments = function.get("arguments", "{}")
        if object_arguments and isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except ValueError:
                raise TemplateError(f"messages[{index}].tool_calls[{number}].function.arguments is not JSON: "
                                    f"{arguments[:80]!r}.") from None
        result.append({**call, "function": {**function, "arguments": arguments}})
    return result


def _missing_content(index: int, role: str) -> NoReturn:
    """A message with no content (absent or None): as OpenAI's API and llama-server, only an assistant
    message that carries ``tool_calls`` may have none. (Templates would fail on it with a TypeError.)"""
    instead = " (an assistant message may carry tool_calls instead)" if role == "assistant" else ""
    raise InvalidConfigError(f"messages[{index}] ({role}) has no content: send {{'role': {role!r}, 'content': "
                             f"'...'}}, with the text as a string or a list of text parts{instead}.")


def normalize_messages(messages: Any, *, object_arguments: bool = False) -> list[dict]:
    """Check chat messages and return plain copies (role and content strings, other keys kept).
    Every message needs content (InvalidConfigError naming it otherwise), except an assistant message
    with ``tool_calls``: its missing content becomes "", as llama.cpp makes it."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError("messages must be a list of {'role': ..., 'content': ...} dicts.")
    if not messages:
        raise TemplateError("messages is empty; give at least one message.")
    result = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(f"messages[{index}] must be a dict with 'role' and 'content'.")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise TemplateError(f"messages[{index}] needs a 'role' string such as 'user'.")
        if role not in ROLES:
            raise InvalidConfigError(f"messages[{index}] has the unknown role {role!r}; use one of "
                                     f"{', '.join(sorted(ROLES))}.")
        copy = dict(message)
        copy["content"] = _content_text(message.get("content"), index)
        if copy["content"] is None and not (role == "assistant" and message.get("tool_calls")):
            _missing_content(index, role)
        if message.get("tool_calls") is not None:
            copy["tool_calls"] = _tool_calls(message["tool_calls"], index, object_arguments)
            if copy["content"] is None:
                copy["content"] = ""
        elif "tool_calls" in copy:
            del copy["tool_calls"]  # null: no calls
        result.append(copy)
    return result


def takes_object_arguments(source: str) -> bool:
    """Whether the template renders a tool call's arguments as a JSON object (most tool templates:
    ``arguments | tojson``) rather than as the string OpenAI sends; probed as llama.cpp probes it."""
    call = {"id": "call_1", "type": "function",
            "function": {"name": "ipython", "arguments": {"argument_needle": "print('Hello, World!')"}}}
    probe: list[dict] = [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    return _probed(_OBJECT_ARGUMENTS, source, probe,
                   lambda text: '"argument_needle":' in text or "'argument_needle':" in text)


def takes_system_role(source: str) -> bool:
    """Whether the template renders a system message (Gemma 2's raises "System role not supported"):
    probed as llama.cpp probes it, with a system and a user message."""
    probe = [{"role": "system", "content": "System message needle"}, {"role": "user", "content": "User message"}]
    return _probed(_SYSTEM_ROLE, source, probe, lambda text: "System message needle" in text)


_OBJECT_ARGUMENTS: dict[str, bool] = {}
_SYSTEM_ROLE: dict[str, bool] = {}


def _probed(known: dict[str, bool], source: str, probe: list[dict], shows: Callable[[str], bool]) -> bool:
    """Whether the template's rendering of ``probe`` ``shows`` a capability (False where it refuses the
    probe), remembered in ``known`` (for up to 64 templates)."""
    if source in known:
        return known[source]
    try:
        answer = shows(render(source, {"messages": probe, "bos_token": "", "eos_token": "",
                                       "add_generation_prompt": False, "tools": None}, len(probe)))
    except TemplateError:
        answer = False
    if len(known) < 64:
        known[source] = answer
    return answer


def _without_system_role(messages: list[dict]) -> list[dict]:
    """For a template without a system role, as llama.cpp does it: the system message's text goes before
    the next message's, on a line of its own (alone, it is dropped)."""
    system, rest = messages[0], messages[1:]
    if rest:
        rest[0] = {**rest[0], "content": f"{system['content']}\n{rest[0]['content'] or ''}"}
    return rest


def load_template(template: str | os.PathLike) -> str:
    """A chat template's text: ``template`` itself, or the file it names (``.jinja`` or a path)."""
    if isinstance(template, os.PathLike) or (isinstance(template, str) and "{" not in template
                                             and "\n" not in template):
        path = Path(template).expanduser()
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise TemplateError(f"cannot read the chat template file {path}: {reason}.") from None
    if not isinstance(template, str):
        raise TemplateError(f"a chat template is a str (Jinja text or a file path), not {type(template).__name__}.")
    return template


def render_chat_template(source: str, messages: Any, *, add_generation_prompt: bool, bos_token: str,
                         eos_token: str, strip_bos: bool = False, strip_eos: bool = False,
                         **extra: Any) -> str:
    """Render ``source`` for ``messages`` exactly as llama.cpp does, in the sandbox.

    ``strip_bos``/``strip_eos`` drop a leading BOS / trailing EOS text that tokenisation
    will add anyway (llama.cpp does the same when the vocabulary adds them).
    """
    has_calls = isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)) and any(
        isinstance(m, Mapping) and m.get("tool_calls") for m in messages)
    # The probe renders the template once more: only when there are tool calls whose arguments it affects.
    object_arguments = has_calls and takes_object_arguments(source)
    normalized = normalize_messages(messages, object_arguments=object_arguments)
    if normalized and normalized[0]["role"] == "system" and not takes_system_role(source):
        normalized = _without_system_role(normalized)
    now = datetime.datetime.now()
    variables: dict[str, Any] = {
        "messages": normalized,
        "bos_token": bos_token, "eos_token": eos_token, "enable_thinking": True,
        # llama.cpp's extra context (common_chat_extra_context): Llama 3.1's template prints the date
        "date_string": now.strftime("%d %b %Y"), "datetime": now.strftime("%b %d %Y")}
    if add_generation_prompt:
        variables["add_generation_prompt"] = True
    variables.update(extra)
    text = render(source, variables, len(variables["messages"]))
    if strip_bos and bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    if strip_eos and eos_token and text.endswith(eos_token):
        text = text[: -len(eos_token)]
    return text
