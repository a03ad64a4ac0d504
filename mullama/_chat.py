"""Chat templates: the model's own Jinja template, rendered as upstream renders it.

Messages are checked and normalised here (roles, text parts); the template itself runs in
the sandbox of ``_template_sandbox`` (jinja2's, with resource limits), because templates come
from model files, which may be hostile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._exceptions import InvalidConfigError, TemplateError
from ._template_sandbox import render

__all__ = ["ROLES", "normalize_messages", "render_chat_template"]

# The roles OpenAI's chat API accepts ("developer" is its newer name for "system").
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _content_text(content: Any, index: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise TemplateError(f"messages[{index}].content: only text parts "
                                    "({'type': 'text', 'text': ...}) are supported.")
            texts.append(part["text"])
        return "\n".join(texts)  # as llama.cpp joins text parts
    raise TemplateError(f"messages[{index}].content must be a string or a list of text parts.")


def normalize_messages(messages: Any) -> list[dict]:
    """Check chat messages and return plain copies (role and content strings, other keys kept)."""
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
        result.append(copy)
    return result


def render_chat_template(source: str, messages: Any, *, add_generation_prompt: bool, bos_token: str,
                         eos_token: str, strip_bos: bool = False, strip_eos: bool = False,
                         **extra: Any) -> str:
    """Render ``source`` for ``messages`` exactly as llama.cpp does, in the sandbox.

    ``strip_bos``/``strip_eos`` drop a leading BOS / trailing EOS text that tokenisation
    will add anyway (llama.cpp does the same when the vocabulary adds them).
    """
    variables: dict[str, Any] = {"messages": normalize_messages(messages), "bos_token": bos_token,
                                 "eos_token": eos_token, "enable_thinking": True}
    if add_generation_prompt:
        variables["add_generation_prompt"] = True
    variables.update(extra)
    text = render(source, variables, len(variables["messages"]))
    if strip_bos and bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    if strip_eos and eos_token and text.endswith(eos_token):
        text = text[: -len(eos_token)]
    return text
