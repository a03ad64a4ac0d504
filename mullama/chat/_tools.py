"""Tool calling: the grammar that makes a model's calls well-formed, and the parser that takes
them out of its output while it streams.

Formats, recognised from the chat template: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(Hermes 2 Pro, Qwen 2.5+), ``{"name": ..., "parameters": {...}}`` (Llama 3.x) and
``[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}]`` (Mistral Nemo). With any other
template (SmolLM2's, which has no tools section), the generic format: the tools are described in the
system message, and an answer that opens with ``{`` is one call, ``{"name": ..., "arguments": {...}}``.
Upstream at our pin leaves the tools out of such prompts; we follow the API's meaning instead: a model
that is given tools is told about them, under ``"auto"`` too.

The calls are constrained by a grammar built from the tools' JSON schemas: lazily for
``tool_choice="auto"`` (it takes hold only once the model starts a call — writes ``<tool_call>``,
or opens its answer with ``{`` in the generic format — so free text stays free, as llama-server
does), from the first token for ``"required"`` or a named function (OpenAI's meaning: the answer is
a call, always parsed into calls). With a ``json_schema`` for the answer as well (the Responses API's
``text.format`` beside tools), the grammar allows either the calls or that JSON.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import InvalidConfigError
from .._text import held_suffix

__all__ = ["ToolCall", "ToolCallParser", "ToolCalling", "calls_tools", "check_tools", "tool_calling",
           "with_tools_described"]

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_WRAPPER_END = re.compile(r"\s*\}?\s*$")  # may close the {"name": ..., "arguments": ...} object


@dataclass(frozen=True)
class CallFormat:
    """How a template's model writes calls: ``start`` opens a call region (kept in the region's text
    when ``keep_start``), ``end`` closes one call (None: the region runs to the end of the output),
    ``arguments`` is the key of the arguments, ``array`` says the region is a JSON list of calls,
    ``id_length`` the length of call ids the template accepts back (0: any)."""

    name: str
    start: str
    end: str | None
    arguments: str = "arguments"
    array: bool = False
    keep_start: bool = False
    id_length: int = 0
    leading: bool = False  # a call can only open the output (after whitespace), not follow text

    def head(self) -> re.Pattern[str]:
        """What precedes a call's arguments: ``{"name": "...", "<arguments>":``."""
        return re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"' + self.arguments + r'"\s*:\s*')


HERMES = CallFormat("hermes", CALL_START, CALL_END)  # Hermes 2 Pro, Qwen 2.5+: <tool_call>{json}</tool_call>
LLAMA3 = CallFormat("llama3", '{"name"', None, arguments="parameters", keep_start=True)  # Llama 3.x: one JSON call
MISTRAL = CallFormat("mistral", "[TOOL_CALLS]", None, array=True, id_length=9)  # Mistral Nemo
# Any other template: the tools go in a system message, and an answer that opens with "{" is one JSON call.
GENERIC = CallFormat("generic", "{", None, keep_start=True, leading=True)
GENERIC_TOOLS = "You can call these tools (JSON Schema for their arguments):\n{tools}\n"
GENERIC_CALL = '{{"name": <tool name>, "arguments": <arguments object>}}'
GENERIC_FORCED = GENERIC_TOOLS + "Answer with one JSON object: " + GENERIC_CALL + "."
GENERIC_AUTO = (GENERIC_TOOLS + "To call a tool, answer with nothing but one JSON object: " + GENERIC_CALL
                + ". Otherwise answer the user as usual.")


def call_format(template: str) -> CallFormat | None:
    """The call format a chat template teaches its model, or None when it is not one of these."""
    if CALL_START in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if '"parameters": ' in template and "tool_call" in template and '{"name": "' in template:
        return LLAMA3
    return None


def calls_tools(template: str | None) -> bool:
    """Whether a model with this chat template can be given tools and call them: with any template it
    can, in the template's own call format (``call_format``) or else in the generic one (the tools
    described in a system message); without one (None: a base model, which has no chat) it cannot.
    What ollama's ``tools`` capability says of a model."""
    return bool(template)


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
    grammar: str
    lazy: bool
    parallel: bool
    triggers: tuple[str, ...]
    format: CallFormat
    root: str  # the grammar's root rule, and its other rules: to combine with an answer's JSON schema
    rules: dict[str, str] = field(compare=False, repr=False)

    @property
    def forced(self) -> bool:
        """The answer must be calls ("required" or a named function)."""
        return not self.lazy

    def or_json(self, schema: Any) -> str:
        """The grammar of an answer that is either these calls or JSON following ``schema`` (from the
        first token: the JSON answer may not wait for a trigger)."""
        from ..structured._json_schema import grammar, json_schema_rules

        start, rules = json_schema_rules(schema, "response-format")
        return grammar(f"( {self.root} ) | {start}", self.rules, rules)


# OpenAI: "omitting parameters defines a function with an empty parameter list" (and so does {}).
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
_SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})
_SUBSCHEMAS = frozenset({"items", "additionalItems", "additionalProperties", "unevaluatedProperties",
                         "unevaluatedItems", "not", "if", "then", "else", "contains", "propertyNames"})


def _arguments_schema(tool: dict, path: str) -> Any:
    """A tool's parameters as they sit at JSON pointer ``path`` of the calls' schema: their own ``#/...``
    references (to their ``$defs``, say: pydantic's nested models) re-rooted there, as llama.cpp resolves
    each tool's references within its parameters."""
    parameters = tool["function"].get("parameters")
    return _rerooted(parameters, path) if parameters else NO_PARAMETERS


def _rerooted(schema: Any, path: str) -> Any:
    """``schema`` with every local ``$ref`` (in it and its subschemas, not in values such as ``const``)
    prefixed with ``path``."""
    if not isinstance(schema, dict):
        return [_rerooted(item, path) for item in schema] if isinstance(schema, list) else schema
    moved: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            value = "#" + path + value[1:]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            value = {name: _rerooted(sub, path) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS or key in _SUBSCHEMAS:
            value = _rerooted(value, path)
        moved[key] = value
    return moved


def _names(tools: list[dict]) -> list[str]:
    return [tool["function"]["name"] for tool in tools]


def tool_calling(template: str, tools: list[dict], tool_choice: Any = "auto",
                 parallel_tool_calls: bool = True) -> ToolCalling | None:
    """The ToolCalling for ``tools`` under ``template`` (None for ``tool_choice="none"``)."""
    from ..structured._json_schema import grammar, json_schema_rules

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
    form = call_format(template) or GENERIC
    if form.end is None:
        parallel = parallel and form.array  # a region to the end of the output holds one call, or one list
    where = ("/items" if form.array else "") + "{}" + f"/properties/{form.arguments}"  # each call's arguments
    one_call = {"anyOf": [{"type": "object", "properties": {
        "name": {"const": tool["function"]["name"]},
        form.arguments: _arguments_schema(tool, where.format(f"/anyOf/{i}" if len(chosen) > 1 else ""))},
        "required": ["name", form.arguments]} for i, tool in enumerate(chosen)]}
    schema: dict[str, Any] = one_call["anyOf"][0] if len(chosen) == 1 else one_call
    if form.array:
        schema = {"type": "array", "items": schema, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    try:
        start, rules = json_schema_rules(schema, "tool-call-json")
    except InvalidConfigError as exc:
        raise InvalidConfigError(f"a tool's parameters are not a JSON Schema calls can follow: {exc}") from None
    opening = "" if form.keep_start else f'"{form.start}" space '
    closing = f' space "{form.end}"' if form.end else ""
    rules = {**rules, "tool-call": f"{opening}{start}{closing}"}
    calls = 'tool-call ("\\n" tool-call)*' if parallel and form.end else "tool-call"
    before = r"\s*" if form.leading else r"[\s\S]*?"
    trigger = before + "(" + re.escape(form.start) + r")[\s\S]*"
    return ToolCalling(tuple(names), grammar(calls, rules), lazy=not forced, parallel=parallel,
                       triggers=() if forced else (trigger,), format=form, root=calls, rules=rules)


class ToolCallParser:
    """Splits streamed output into content and tool calls, for one CallFormat.

    ``feed(text)`` returns ``(content, in_call)``: the content it can release now (text that might
    begin a call is held back until it is known not to), and whether the text fed ended inside a
    call. Finished calls collect in ``calls``; while a call is written, ``name`` (once known) and
    ``arguments`` (as far as certain) describe it, for streamed deltas. Whitespace before the
    content and between calls is dropped, as llama-server's parser drops it.
    """

    def __init__(self, form: CallFormat) -> None:
        self.form = form
        self._head = form.head() if not form.array else None
        self.started = False  # content (or a call) began
        self._skip_space = True  # before the content, and after a call: whitespace is dropped
        self.calls: list[ToolCall] = []
        self._held = ""  # content that may begin a call marker
        self._call: str | None = None  # the text of the call region being written
        self.name: str | None = None
        self.arguments = ""

    @property
    def in_call(self) -> bool:
        return self._call is not None

    def feed(self, text: str) -> tuple[str, bool]:
        content = []
        text, self._held = self._held + text, ""
        form = self.form
        while text:
            if self._call is not None:
                if form.end is None:  # the region runs to the end of the output
                    self._call += text
                    self._update()
                    break
                written = self._call
                combined = written + text
                end = combined.find(form.end, max(0, len(written) - len(form.end) + 1))
                if end < 0:
                    self._call = combined
                    self._update()
                    break
                self._call = combined[:end]
                content.append(self._close())
                text = combined[end + len(form.end):]
                continue
            if self._skip_space:
                text = text.lstrip()
                if not text:
                    break
                self._skip_space = False
            if form.leading:  # a call opens the output, or there is none
                start = 0 if not self.started and text.startswith(form.start) else -1
            else:
                start = text.find(form.start)
            if start < 0:
                keep = 0 if form.leading else held_suffix(text, (form.start,))
                content.append(text[: len(text) - keep])
                self._held = text[len(text) - keep:]
                self.started = self.started or keep != len(text)
                break
            content.append(text[:start])
            self.started = True
            self._call, self.name, self.arguments = (form.start if form.keep_start else ""), None, ""
            self._skip_space = True
            text = text[start + len(form.start):]
        return "".join(content), self._call is not None

    def finish(self) -> str:
        """The end of the output: held-back text is content; a call region that runs to the end is
        closed (an unfinished one, cut by the token limit, is dropped)."""
        held, self._held = self._held, ""
        if self._call is not None:
            if self.form.end is None:
                held += self._close()
            self._call = None
        return held

    def _update(self) -> None:
        """What is certain of the call being written: its name, and its arguments without what may
        close the wrapper object or begin the end marker."""
        if self._head is None:
            return
        written = self._call or ""
        match = self._head.match(written)
        if match is None:
            return
        self.name = json.loads(f'"{match.group(1)}"')
        end = self.form.end
        rest = written[match.end(): len(written) - (held_suffix(written, (end,)) if end else 0)]
        tail = _WRAPPER_END.search(rest)
        self.arguments = rest[: tail.start()] if tail else rest

    def _close(self) -> str:
        """A call region ended: keep its calls (arguments as written when they are JSON: what was
        streamed). A region that holds no calls is content (a JSON answer beside tools): its text."""
        text, self._call = self._call or "", None
        form = self.form
        try:
            value = json.loads(text)
        except ValueError:
            return ""  # an unfinished call (cut by the token limit): nothing to run
        try:
            items = value if form.array else [value]
            found = [(item["name"], item.get(form.arguments, {}), item.get("id")) for item in items]
            if not all(isinstance(item, dict) and form.arguments in item and set(item) <= {"name", form.arguments, "id"}
                       for item in items) or not all(isinstance(name, str) for name, _, _ in found):
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            return text  # not calls after all: an answer in JSON
        for name, arguments, given_id in found:
            arguments_text = json.dumps(arguments, ensure_ascii=False)
            if len(found) == 1 and self._head is not None:
                match = self._head.match(text)
                written = text[match.end():] if match else ""
                tail = _WRAPPER_END.search(written)
                written = written[: tail.start()] if tail else written
                if match and _is_json(written):
                    arguments_text = written.strip()
            if isinstance(arguments, str):
                arguments_text = arguments
            self.calls.append(ToolCall(_call_id(form, given_id), name, arguments_text))
            self.name, self.arguments = name, arguments_text
        return ""


def _call_id(form: CallFormat, given: Any) -> str:
    """The model's own id when the template can take it back, else a new one of the right shape."""
    if form.id_length:
        if isinstance(given, str) and len(given) == form.id_length and given.isalnum():
            return given
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return "".join(secrets.choice(alphabet) for _ in range(form.id_length))
    return f"call_{secrets.token_hex(12)}"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def check_tools(tools: Any) -> list[dict]:
    """OpenAI function tools, checked (``[{"type": "function", "function": {"name": ..., "parameters":
    {...}}}]``) and rebuilt as llama-server rebuilds them for the template: each function's name,
    description ("" when none) and parameters ({} when none), nothing else (``strict`` and other keys
    left out), so that the prompt is llama-server's."""
    if not isinstance(tools, list):
        raise InvalidConfigError(f"tools must be a list of {{'type': 'function', 'function': {{...}}}}, not "
                                 f"{type(tools).__name__}.")
    rebuilt = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise InvalidConfigError(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ..., "
                                     "'parameters': {...}}}}.")
        name = function.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-." for c in name):
            raise InvalidConfigError(f"tools[{index}].function.name must be 1-64 letters, digits, '_', '-' or '.', "
                                     f"not {name!r}.")
        parameters = function.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidConfigError(f"tools[{index}].function.parameters must be a JSON Schema object.")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise InvalidConfigError(f"tools[{index}].function.description must be a string.")
        rebuilt.append({"type": "function", "function": {"name": name, "description": description,
                                                         "parameters": parameters}})
    return rebuilt

def with_tools_described(messages: list[dict], tools: list[dict], *, forced: bool) -> list[dict]:
    """``messages`` (normalised: contents are strings) for a template with no tools section: the tools
    described in the system message (added when there is none), and earlier calls written as the JSON
    the model answers with."""
    description = (GENERIC_FORCED if forced else GENERIC_AUTO).format(
        tools="\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools))
    messages = [_calls_as_text(message) for message in messages]
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + description}, *messages[1:]]
    return [{"role": "system", "content": description}, *messages]


def _calls_as_text(message: dict) -> dict:
    """A normalised assistant message's tool calls as the generic format's JSON, after its content."""
    if message["role"] != "assistant" or not message.get("tool_calls"):
        return message
    written = [json.dumps({"name": call["function"]["name"], "arguments": _value(call["function"]["arguments"])},
                          ensure_ascii=False) for call in message["tool_calls"]]
    rest = {key: value for key, value in message.items() if key != "tool_calls"}
    return rest | {"content": "\n".join(filter(None, [message["content"], *written]))}


def _value(arguments: Any) -> Any:
    """Arguments given as JSON text, as the value they stand for (other text as it is)."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
