"""Chat templates: the model's own Jinja template, rendered in a sandbox, as upstream renders it.

Templates come from model files, which may be hostile: they run in jinja2's
ImmutableSandboxedEnvironment, which refuses access to Python internals and to
mutation of the inputs; any failure is a TemplateError. The environment mirrors what
llama.cpp (and Hugging Face transformers) give templates: ``trim_blocks`` and
``lstrip_blocks``, loop controls, ``raise_exception``, ``strftime_now``, a ``tojson``
that keeps non-ASCII text, and the variables ``messages``, ``bos_token``,
``eos_token``, ``add_generation_prompt`` and ``enable_thinking``.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ._exceptions import InvalidConfigError, TemplateError

__all__ = ["normalize_messages", "render_chat_template"]

MAX_OUTPUT_CHARS = 10_000_000
# The roles OpenAI's chat API accepts ("developer" is its newer name for "system").
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _raise_exception(message: str) -> None:
    raise TemplateError(f"the chat template refused the messages: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise TemplateError(f"the model's chat template does not parse: {exc}") from None


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
    """Render ``source`` for ``messages`` exactly as llama.cpp does.

    ``strip_bos``/``strip_eos`` drop a leading BOS / trailing EOS text that tokenisation
    will add anyway (llama.cpp does the same when the vocabulary adds them).
    """
    import jinja2

    template = _compile(source)
    variables: dict[str, Any] = {"messages": normalize_messages(messages), "bos_token": bos_token,
                                 "eos_token": eos_token, "enable_thinking": True}
    if add_generation_prompt:
        variables["add_generation_prompt"] = True
    variables.update(extra)
    try:
        parts, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_OUTPUT_CHARS:
                raise TemplateError("the chat template produced more than 10 million characters; refusing it.")
            parts.append(chunk)
        text = "".join(parts)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"the chat template tried something unsafe and was stopped: {exc}") from None
    except Exception as exc:  # noqa: BLE001 (a template is untrusted code: every failure is reported alike)
        raise TemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
    if strip_bos and bos_token and text.startswith(bos_token):
        text = text[len(bos_token):]
    if strip_eos and eos_token and text.endswith(eos_token):
        text = text[: -len(eos_token)]
    return text
