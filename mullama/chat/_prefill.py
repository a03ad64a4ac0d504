"""Assistant prefill: a trailing assistant message is the start of the answer, and the model continues it.

llama-server does this by default (``prefill_assistant``; the "auto" continuation of its
``continue_final_message``): the messages before the last are rendered without the generation
prompt, then come the generation prompt (what the template adds to open an assistant turn) and the
message's text, left open. For a template that thinks in ``<think>`` tags the message's
``reasoning_content`` goes inside them, closed unless the message has reasoning and no content.
Anthropic's Messages API documents the same continuation ("prefill Claude's response").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._exceptions import InvalidConfigError, MullamaError
from ._reasoning import THINK_END, THINK_START, thinks
from ._template import normalize_messages

__all__ = ["Prefill", "continued_prompt", "prefill_text", "split_prefill"]


@dataclass(frozen=True)
class Prefill:
    """The trailing assistant message: its text (parts joined as llama.cpp joins them) and thought."""

    content: str
    reasoning: str = ""


def split_prefill(messages: Any) -> tuple[Any, Prefill | None]:
    """The messages before a trailing assistant message, and that message (None, and the messages as
    they are, when the last message is not the assistant's). The ones llama-server refuses to continue
    are refused with InvalidConfigError."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        return messages, None
    last = messages[-1]
    if not isinstance(last, Mapping) or last.get("role") != "assistant":
        return messages, None
    if len(messages) == 1:
        raise InvalidConfigError("the only message is the assistant's: a trailing assistant message is the start "
                                 "of the answer to the messages before it; put the user's message first.")
    before = messages[-2]
    if isinstance(before, Mapping) and before.get("role") == "assistant":
        raise InvalidConfigError("the messages end with two assistant messages; a trailing assistant message is the "
                                 "start of the answer (a prefill): merge them into one.")
    if last.get("tool_calls"):
        raise InvalidConfigError("the last message is an assistant message with tool_calls, which cannot be "
                                 "continued: send the tools' results (role 'tool') after it.")
    (message,) = normalize_messages([last])  # checks its content and joins its text parts
    reasoning = last.get("reasoning_content")
    return messages[:-1], Prefill(message["content"] or "", reasoning if isinstance(reasoning, str) else "")


def prefill_text(messages: Any) -> str:
    """The text a trailing assistant message puts before the generated answer ("" when there is none)."""
    _before, prefill = split_prefill(messages)
    return prefill.content if prefill is not None else ""


def continued_prompt(render: Callable[[Any, bool], str], before: Any, prefill: Prefill, template: str) -> str:
    """The prompt that continues ``prefill`` after the messages ``before`` it: ``render(messages,
    add_generation_prompt)`` is the template's rendering."""
    if "<|channel|>" in template:  # gpt-oss: llama.cpp continues its channels in a way of its own
        raise InvalidConfigError("this chat template (gpt-oss's channels) cannot continue a trailing assistant "
                                 "message here: end the messages with the user's message.")
    closed = render(before, False)
    opened = render(before, True)
    shared = next((i for i, (a, b) in enumerate(zip(closed, opened)) if a != b), min(len(closed), len(opened)))
    opening = opened[shared:]
    if thinks(template):
        cut = opening.find(THINK_START)
        if cut >= 0:
            opening = opening[:cut]
        start, end = _thought_markers(render)
        opening += start + prefill.reasoning
        if prefill.content or not prefill.reasoning:
            opening += end + prefill.content
    else:
        opening += prefill.content
    return closed + opening


def _thought_markers(render: Callable[[Any, bool], str]) -> tuple[str, str]:
    """What the template writes before and after an assistant message's thought, whitespace included
    (Qwen3: ``"<think>\\n"`` and ``"\\n</think>\\n\\n"``), as llama.cpp finds them by rendering one; the
    bare tags where the template leaves the thought out."""
    thought, answer = "THOUGHT_NEEDLE", "ANSWER_NEEDLE"
    try:
        text = render([{"role": "user", "content": "Q"},
                       {"role": "assistant", "content": answer, "reasoning_content": thought}], False)
    except MullamaError:
        return THINK_START, THINK_END
    at = text.find(thought)
    start = text.rfind(THINK_START, 0, at) if at >= 0 else -1
    end = text.find(THINK_END, at)
    after = text.find(answer, end)
    if start < 0 or end < 0 or after < 0:
        return THINK_START, THINK_END
    return text[start:at], text[at + len(thought):after]
