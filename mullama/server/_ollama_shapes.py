"""ollama's response shapes for /api/chat and /api/generate: a streamed line (a piece of content or of
the thought, tool calls, logprobs) and the done line with ollama's statistics."""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["chat_line", "done_line", "timestamp"]


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1e6) % 1_000_000:06d}Z"


def chat_line(kind: str, model: str, text: str = "", tool_calls: list[Any] | None = None,
              logprobs: list[dict] | None = None, thinking: str = "") -> dict:
    """One streamed piece: ``message`` for /api/chat, ``response`` for /api/generate; with ``logprobs``,
    those of the tokens whose text it carries (ollama leaves the field out when there are none); with
    ``thinking``, a piece of the model's thought (``message.thinking``, or ``thinking`` beside
    ``response``, as ollama's)."""
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = [{"function": {"name": call.name, "arguments": json.loads(call.arguments)}}
                                     for call in tool_calls]
        line = {"model": model, "created_at": timestamp(), "message": message, "done": False}
    else:
        line = {"model": model, "created_at": timestamp(), "response": text, "done": False}
        if thinking:
            line["thinking"] = thinking
    if logprobs:
        line["logprobs"] = logprobs
    return line


def done_line(kind: str, model: str, job: Any, started: float, text: str = "", tool_calls: list[Any] | None = None,
              logprobs: list[dict] | None = None, thinking: str = "") -> dict:
    """The last line (or the whole non-streamed body, with the logprobs of all its tokens and the whole
    thought): the reason and ollama's statistics."""
    line = chat_line(kind, model, text, tool_calls, logprobs, thinking)
    sequence = job._sequence
    prompt_seconds = job.prompt_seconds() or 0.0
    first, last = sequence.first_token, sequence.last_token
    line.update(done=True, done_reason="length" if job.finish_reason == "length" else "stop",
                total_duration=int((time.perf_counter() - started) * 1e9), load_duration=0,
                prompt_eval_count=job.prompt_tokens, prompt_eval_duration=int(prompt_seconds * 1e9),
                eval_count=job.completion_tokens,
                eval_duration=int(((last - first) if first is not None and last is not None else 0.0) * 1e9))
    return line
