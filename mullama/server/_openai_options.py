"""OpenAI's request options that reach the prompt or the drafts rather than the sampler: the reasoning
effort (chat's ``reasoning_effort``, Responses' ``reasoning.effort``), which goes to the chat template
as llama-server gives it, and a predicted output (``prediction``), where n-gram drafts are looked up."""

from __future__ import annotations

from typing import Any

from ._request import bad

__all__ = ["checked_effort", "predicted_text", "with_reasoning_effort"]


def predicted_text(prediction: Any) -> str | None:
    """OpenAI's predicted output, ``{"type": "content", "content": text or text parts}``, as its text
    (n-gram drafts are looked up in it: a faster answer, the same one)."""
    if prediction is None:
        return None
    content = prediction.get("content") if isinstance(prediction, dict) and prediction.get("type") == "content" \
        else None
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise bad("'prediction' must be {\"type\": \"content\", \"content\": the text expected} (a string or "
                  "text parts).", "prediction")
    return content or None  # an empty prediction predicts nothing


def checked_effort(effort: Any, name: str) -> str | None:
    """A reasoning effort (chat's ``reasoning_effort``, Responses' ``reasoning.effort``): None or a
    level's name; anything else is a 400 naming ``name``."""
    if effort is not None and (not isinstance(effort, str) or not effort):
        raise bad(f"'{name}' must be a string such as 'none', 'minimal', 'low', 'medium' or 'high'.",
                  name.split(".")[0])
    return effort


def with_reasoning_effort(kwargs: dict | None, effort: Any) -> dict | None:
    """OpenAI's ``reasoning_effort`` as llama-server gives it to the chat template: "none" turns
    thinking off (``enable_thinking`` false), another level is the template's ``reasoning_effort``
    variable (a template without one renders as before)."""
    if checked_effort(effort, "reasoning_effort") is None:
        return kwargs
    kwargs = dict(kwargs or {})
    if effort == "none":
        kwargs.pop("reasoning_effort", None)
        kwargs["enable_thinking"] = False
    else:
        kwargs["reasoning_effort"] = effort
    return kwargs
