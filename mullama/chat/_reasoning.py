"""Reasoning: the ``<think>…</think>`` part of a thinking model's answer, kept apart from the content.

DeepSeek-R1 and Qwen3 style: the model thinks inside ``<think>`` tags before it answers; some
templates open the tag themselves at the end of the prompt (DeepSeek-R1's ends with ``<think>``),
so the answer starts inside the thought. As llama-server's ``--reasoning-format auto``, the
thought goes to ``reasoning`` (``reasoning_content`` on the wire) and the rest to the content;
``reasoning_format="none"`` leaves it all in the content.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._text import held_suffix

__all__ = ["Reasoning", "ReasoningParser", "reasoning_for", "thinks"]

THINK_START, THINK_END = "<think>", "</think>"


@dataclass(frozen=True)
class Reasoning:
    """How one generation's thought is found: ``opened`` when the prompt ends inside it, after
    ``begun`` (the prompt's text after its ``<think>``, which llama-server counts as thought)."""

    opened: bool
    begun: str = ""


def thinks(template: str | None) -> bool:
    """Whether a model with this chat template can think: the template writes a ``<think>`` thought
    (None, no template, cannot). What ollama's ``think: true`` asks of a model."""
    return template is not None and THINK_START in template


def reasoning_for(template: str, prompt: str, reasoning_format: str) -> Reasoning | None:
    """The Reasoning of a chat turn: None when the template knows no thinking or the format is "none"."""
    if reasoning_format == "none" or not thinks(template):
        return None
    if not prompt.rstrip().endswith(THINK_START):
        return Reasoning(opened=False)
    return Reasoning(opened=True, begun=prompt[prompt.rindex(THINK_START) + len(THINK_START):])


class ReasoningParser:
    """Splits streamed text into (content, reasoning); text that may be part of a tag is held back."""

    def __init__(self, reasoning: Reasoning) -> None:
        self.state = "thinking" if reasoning.opened else "start"  # start, thinking, after (the thought), content
        self._held = reasoning.begun  # released as thought with the first token

    def feed(self, text: str) -> tuple[str, str]:
        content: list[str] = []
        thought: list[str] = []
        text, self._held = self._held + text, ""
        while text:
            if self.state == "start":
                stripped = text.lstrip()
                if stripped.startswith(THINK_START):
                    self.state, text = "thinking", stripped[len(THINK_START):]
                elif not stripped or THINK_START.startswith(stripped):
                    self._held = text  # whitespace, or the beginning of a tag: not known yet
                    break
                else:
                    self.state = "content"
            elif self.state == "thinking":
                end = text.find(THINK_END)
                if end < 0:
                    keep = held_suffix(text, (THINK_END,))
                    thought.append(text[: len(text) - keep])
                    self._held = text[len(text) - keep:]
                    break
                thought.append(text[:end])
                self.state, text = "after", text[end + len(THINK_END):]
            elif self.state == "after":  # the whitespace between the thought and the answer is neither
                text = text.lstrip()
                if text:
                    self.state = "content"
            else:
                content.append(text)
                break
        return "".join(content), "".join(thought)

    def finish(self) -> tuple[str, str]:
        """The end: what was held back goes where it was heading."""
        held, self._held = self._held, ""
        if self.state == "thinking":
            return "", held
        return ("", "") if self.state == "after" else (held, "")
