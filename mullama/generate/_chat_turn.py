"""One chat turn: the prompt a model's template makes of the messages, and the StreamConfig to
generate the answer with (tool calling, a JSON answer's fence, reasoning blocks). One place for
Context, AsyncModel and the server."""

from __future__ import annotations

from typing import Any

from .._exceptions import InvalidConfigError
from ..chat._media_parts import MediaSource, has_media, split_media
from ..chat._prefill import continued_prompt, split_prefill
from ..chat._reasoning import reasoning_for
from ..chat._template import load_template, normalize_messages
from ..chat._tools import GENERIC, check_tools, tool_calling, with_tools_described
from ._arguments import check_kwargs
from ._config import StreamConfig
from ._media import DEFAULT_LIMITS, MediaLimits, MediaPrompt, check_projector_model
from ._model import Model, tokenize_prompt

__all__ = ["chat_media", "chat_prompt", "chat_turn", "turn_tokens"]


# What the template gets from the chat itself (Model.apply_chat_template's own arguments).
RESERVED_VARIABLES = frozenset({"messages", "add_generation_prompt", "tools", "template", "bos_token", "eos_token",
                                "strip_bos", "strip_eos"})


def chat_prompt(model: Model, messages: list[dict[str, Any]], config: StreamConfig, *,
                tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool, chat_template: Any,
                chat_template_kwargs: dict[str, Any] | None,
                reasoning_format: str = "auto") -> tuple[str, StreamConfig]:
    """The prompt text for a chat turn and the StreamConfig to generate it with (tool calling set up
    when ``tools`` are given): one place for Context, AsyncModel and the server."""
    kwargs = check_kwargs("chat_template_kwargs", chat_template_kwargs)
    taken = sorted(set(kwargs) & RESERVED_VARIABLES)
    if taken:
        raise InvalidConfigError(f"chat_template_kwargs cannot set {', '.join(taken)}: the chat itself gives the "
                                 "template those; give other variables (such as enable_thinking).",
                                 field="chat_template_kwargs")
    template = load_template(chat_template) if chat_template is not None else model.chat_template
    if tools:
        tools = check_tools(tools)
        if template is None:
            raise InvalidConfigError("this model has no chat template to describe tools with; pass chat_template=...")
        calling = tool_calling(template, tools, tool_choice, parallel_tool_calls)
        if calling is not None:
            if config.grammar is not None:
                raise InvalidConfigError("a grammar cannot be combined with tools (a json_schema can).")
            config = config.with_options(tool_calls=calling)
    elif tool_choice not in ("auto", "none", None):
        raise InvalidConfigError(f"tool_choice {tool_choice!r} needs tools.")
    if reasoning_format not in ("auto", "none"):
        raise InvalidConfigError(f"reasoning_format must be 'auto' or 'none', not {reasoning_format!r}.")
    calling = config.tool_calls
    if calling is None and config.json_schema is not None:
        config = config.with_options(fenced_json=True)
    before, prefill = split_prefill(messages)
    if prefill is not None and (calling is not None or config.json_schema is not None or config.grammar is not None):
        raise InvalidConfigError("a trailing assistant message (the start of the answer, a prefill) cannot be combined "
                                 "with tools, a JSON schema or a grammar, which constrain the answer from its start: "
                                 "drop one of them.")
    if calling is not None and calling.format is GENERIC:
        messages = with_tools_described(normalize_messages(messages), tools or [], forced=calling.forced)

    def render(some: Any, add_generation_prompt: bool) -> str:
        return model.apply_chat_template(some, add_generation_prompt=add_generation_prompt, template=template,
                                         tools=tools or None, **kwargs)

    prompt = (render(messages, True) if prefill is None
              else continued_prompt(render, before, prefill, template or ""))
    reasoning = reasoning_for(template or "", prompt, reasoning_format)
    if reasoning is not None:
        config = config.with_options(reasoning=reasoning)
    return prompt, config


def chat_media(model: Model, messages: Any) -> tuple[Any, list[MediaSource]]:
    """``messages`` with their images and audio replaced by the projector's marker, and those media in
    order (none, and the messages as they are, when they hold none)."""
    if not has_media(messages):
        return messages, []
    return split_media(messages, check_projector_model(model).marker)


def chat_turn(model: Model, messages: list[dict[str, Any]], config: StreamConfig, *,
              limits: MediaLimits = DEFAULT_LIMITS, **options: Any) -> tuple[str | MediaPrompt, StreamConfig]:
    """:func:`chat_prompt` for messages that may hold images and audio: the prompt text, or when they
    hold media, the prompt tokenized with them (a MediaPrompt, checked against ``limits``)."""
    messages, media = chat_media(model, messages)
    prompt, config = chat_prompt(model, messages, config, **options)
    if not media:
        return prompt, config
    return check_projector_model(model).tokenize(prompt, media, limits), config


def turn_tokens(model: Model, prompt: str | MediaPrompt) -> tuple[list[int], MediaPrompt | None]:
    """The tokens of what :func:`chat_turn` made, and the MediaPrompt that evaluates them (or None)."""
    if isinstance(prompt, MediaPrompt):
        return prompt.tokens, prompt
    return tokenize_prompt(model, prompt), None
