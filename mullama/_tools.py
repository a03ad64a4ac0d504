"""Tool calling: the grammar that makes a model's calls well-formed, and the parser that takes
them out of its output while it streams.

Supported here: the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` format of
Hermes 2 Pro, Qwen 2.5 and later Qwen templates, recognised from the chat template. With
other templates (Llama 3.x, Mistral, or none that describes tools) the tools are rendered as
the template renders them and ``"auto"`` answers are text, unparsed, as llama-server answered
on this model; forcing a call there is refused. The
calls are constrained by a grammar built from the tools' JSON schemas: lazily for
``tool_choice="auto"`` (it takes hold only once the model writes ``<tool_call>``, so free
text stays free, as llama-server does), from the first token for ``"required"`` or a named
function (OpenAI's meaning: the answer is a call).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._exceptions import InvalidConfigError
from ._text import held_suffix

if TYPE_CHECKING:
    from ._config import StreamConfig
    from ._model import Model

__all__ = ["ToolCall", "ToolCallParser", "ToolCalling", "tool_calling"]

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
# What precedes a call's arguments: {"name": "...", "arguments":
_WRAPPER_END = re.compile(r"\s*\}?\s*$")  # may close the {"name": ..., "arguments": ...} object
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is a JSON text, as OpenAI gives it."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCalling:
    """How one generation calls tools: the format, the grammar, and whether the grammar waits
    for the call to start (``lazy``)."""

    tools: tuple[str, ...]  # the function names
    grammar: str | None  # None: calls are not constrained (nor parsed: "text" answers)
    lazy: bool
    parallel: bool
    triggers: tuple[str, ...] = field(default=())
    parsed: bool = True  # False: a template whose call format is not known; the answer is text


def _names(tools: list[dict]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


def supports(template: str) -> bool:
    """Whether ``template`` writes calls in the format this module knows."""
    return CALL_START in template


def tool_calling(template: str, tools: list[dict], tool_choice: Any = "auto",
                 parallel_tool_calls: bool = True) -> ToolCalling | None:
    """The ToolCalling for ``tools`` under ``template`` (None for ``tool_choice="none"``)."""
    from ._json_schema import json_schema_to_grammar

    names = _names(tools)
    if tool_choice == "none":
        return None
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function") if tool_choice.get("type", "function") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise InvalidConfigError(f"tool_choice names the function {name!r}, which is not among the tools "
                                     f"({', '.join(names)}).")
        chosen = [tool for tool in tools if tool["function"]["name"] == name]
        forced, parallel = True, False
    elif tool_choice in ("auto", "required"):
        chosen, forced, parallel = tools, tool_choice == "required", bool(parallel_tool_calls)
    else:
        raise InvalidConfigError(f"tool_choice must be 'auto', 'none', 'required' or "
                                 f"{{'type': 'function', 'function': {{'name': ...}}}}, not {tool_choice!r}.")
    if not supports(template):
        if not forced:  # the tools are described (if the template can); the answer is text, unparsed
            return ToolCalling(tuple(names), None, lazy=False, parallel=parallel, parsed=False)
        raise InvalidConfigError("this chat template has no tool-call format mullama can force yet (supported: "
                                 "the <tool_call> format of Hermes 2 Pro and Qwen 2.5+); pass chat_template=... with "
                                 "such a template, e.g. llama.cpp's models/templates/Qwen-Qwen2.5-7B-Instruct.jinja, "
                                 "or use tool_choice 'auto'.")
    schema: dict[str, Any] = {"anyOf": [{"type": "object", "properties": {
        "name": {"const": tool["function"]["name"]},
        "arguments": tool["function"].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"]} for tool in chosen]}
    if len(chosen) == 1:
        schema = schema["anyOf"][0]
    rules = json_schema_to_grammar(schema).replace("root ::=", "tool-call-json ::=", 1)
    calls = 'tool-call ("\\n" tool-call)*' if parallel else "tool-call"
    grammar = (f"root ::= {calls}\n"
               f'tool-call ::= "{CALL_START}" space tool-call-json space "{CALL_END}"\n{rules}')
    return ToolCalling(tuple(names), grammar, lazy=not forced, parallel=parallel,
                       triggers=(rf"[\s\S]*?({re.escape(CALL_START)})[\s\S]*",) if not forced else ())


class ToolCallParser:
    """Splits streamed output into content and tool calls.

    ``feed(text)`` returns ``(content, in_call)``: the content it can release now (text that might
    be the beginning of ``<tool_call>`` is held back until it is known not to be), and whether the
    text fed ended inside a call. Finished calls collect in ``calls``; ``pending`` describes the
    call being written (its index, name once known, and the arguments text so far), for streamed deltas.
    """

    def __init__(self, parsed: bool = True) -> None:
        self.parsed = parsed  # False: no call format to look for (the answer is text)
        self.started = False  # content began (whitespace before it is dropped, as llama-server drops it)
        self.calls: list[ToolCall] = []
        self._held = ""  # content that may begin a call marker
        self._call: str | None = None  # the text of the call being written
        self.name: str | None = None
        self.arguments = ""  # the arguments of the call being written, as far as they are certain

    def feed(self, text: str) -> tuple[str, bool]:
        content = []
        text = self._held + text
        self._held = ""
        while text:
            if self._call is None:
                if not self.started:
                    text = text.lstrip()
                    if not text:
                        break
                    self.started = True
                start = text.find(CALL_START) if self.parsed else -1
                if start < 0:
                    keep = held_suffix(text, (CALL_START,)) if self.parsed else 0
                    released = text[: len(text) - keep]
                    if self.calls and not released.strip():
                        released = ""  # whitespace between or after calls is not content
                    content.append(released)
                    self._held = text[len(text) - keep:]
                    break
                if not (self.calls and not text[:start].strip()):
                    content.append(text[:start])
                self._call, self.name, self.arguments = "", None, ""
                text = text[start + len(CALL_START):]
            else:
                written = self._call
                combined = written + text
                end = combined.find(CALL_END, max(0, len(written) - len(CALL_END) + 1))
                if end < 0:
                    self._call = combined
                    self._update()
                    break
                self._call = combined[:end]
                self._close()
                text = combined[end + len(CALL_END):]
        return "".join(content), self._call is not None

    def finish(self) -> str:
        """The end of the output: held-back text is content; an unfinished call is dropped."""
        held, self._held = self._held, ""
        if self._call is not None:
            self._call = None
        return held

    @property
    def in_call(self) -> bool:
        return self._call is not None

    def _update(self) -> None:
        """What is certain of the pending call: its name, and its arguments without a trailing
        ``}`` and whitespace (which may close the wrapper object)."""
        match = _HEAD.match(self._call or "")
        if match is None:
            return
        self.name = json.loads(f'"{match.group(1)}"')
        written = self._call or ""
        rest = written[match.end(): len(written) - held_suffix(written, (CALL_END,))]
        tail = _WRAPPER_END.search(rest)
        self.arguments = rest[: tail.start()] if tail else rest

    def _close(self) -> None:
        """A call ended: keep it (its arguments as written, when they are JSON: what was streamed)."""
        text, self._call = self._call or "", None
        try:
            value = json.loads(text)
            name, arguments = value["name"], value.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # not a call after all (only without a grammar); nothing to run
        match = _HEAD.match(text)
        written = text[match.end():] if match else ""
        tail = _WRAPPER_END.search(written)
        written = written[: tail.start()] if tail else written
        arguments_text = written.strip() if match and _is_json(written) else json.dumps(arguments, ensure_ascii=False)
        self.calls.append(ToolCall(f"call_{secrets.token_hex(12)}", name, arguments_text))
        self.name, self.arguments = name, arguments_text


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def chat_prompt(model: Model, messages: list[dict], config: StreamConfig, *, tools: list[dict] | None,
                tool_choice: Any, parallel_tool_calls: bool, chat_template: Any,
                chat_template_kwargs: dict | None, reasoning_format: str = "auto") -> tuple[str, StreamConfig]:
    """The prompt text for a chat turn and the StreamConfig to generate it with (tool calling set up
    when ``tools`` are given): one place for Context, AsyncModel and the server."""
    from ._chat import load_template
    from ._model import check_tools
    from ._reasoning import reasoning_for

    kwargs = dict(chat_template_kwargs or {})
    if not all(isinstance(key, str) for key in kwargs):
        raise InvalidConfigError("chat_template_kwargs must be a dict with str keys.")
    template = load_template(chat_template) if chat_template is not None else model.chat_template
    if tools:
        check_tools(tools)
        if template is None:
            raise InvalidConfigError("this model has no chat template to describe tools with; pass chat_template=...")
        calling = tool_calling(template, tools, tool_choice, parallel_tool_calls)
        if calling is not None:
            if config.grammar is not None or config.json_schema is not None:
                raise InvalidConfigError("a grammar or json_schema cannot be combined with tools.")
            config = config.with_options(tool_calls=calling)
    elif tool_choice not in ("auto", "none", None):
        raise InvalidConfigError(f"tool_choice {tool_choice!r} needs tools.")
    if reasoning_format not in ("auto", "none"):
        raise InvalidConfigError(f"reasoning_format must be 'auto' or 'none', not {reasoning_format!r}.")
    prompt = model.apply_chat_template(messages, add_generation_prompt=True, template=template,
                                       tools=tools or None, **kwargs)
    reasoning = reasoning_for(template or "", prompt, reasoning_format)
    if reasoning is not None:
        config = config.with_options(reasoning=reasoning)
    return prompt, config
