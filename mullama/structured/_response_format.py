"""A chat's JSON answer (``response_format``, ``chat_stream(json_schema=...)``) as upstream's chat
route shapes it at our pin (``common/chat-auto-parser-generator.cpp``): the model may write the JSON
bare or inside a Markdown ```` ```json ```` fence, with whitespace around it, and the answer's content
is the JSON alone.

Small models reach for the fence; forcing bare JSON from the first token pushes them off their path,
so the grammar allows both (the same language as upstream's, so greedy answers are the same), and
:class:`JsonFence` takes the fence and the whitespace off the streamed text. A completion
(``generate_stream(json_schema=...)``, ``/v1/completions``, llama-server's ``/completion``) has no
fence: its output is the JSON from the first token.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ._json_schema import grammar, json_schema_rules

__all__ = ["FENCE", "JsonFence", "chat_json_grammar"]

FENCE, FENCE_END = "```json", "```"
_TRAILING = re.compile(r"[\s`]*$")  # what may be the whitespace and fence after the JSON: held back


def chat_json_grammar(schema: Mapping[str, Any] | bool) -> str:
    """The grammar of a chat answer that follows ``schema``: upstream's ``space`` (after the generation
    prompt), then ``space`` and either the fenced JSON or the bare JSON, each with ``space`` around it."""
    start, rules = json_schema_rules(schema, "response-format")
    return grammar(f'space space ( "{FENCE}" space {start} space "{FENCE_END}" | space {start} space )', rules)


class JsonFence:
    """Streams the JSON of a chat answer without the fence and whitespace around it.

    ``feed(text)`` returns the content it can release: leading whitespace and an opening
    ```` ```json ```` are dropped; whitespace and backticks at the end of what was fed are held until
    more text shows they are inside the JSON (a string may hold them). ``finish()`` returns what is
    held, less the closing whitespace and fence.
    """

    __slots__ = ("_held", "_opening")

    def __init__(self) -> None:
        self._opening = True  # before the JSON's first character
        self._held = ""

    def feed(self, text: str) -> str:
        text, self._held = self._held + text, ""
        if self._opening:
            text = text.lstrip()
            if text and FENCE.startswith(text[: len(FENCE)]) and len(text) < len(FENCE):
                self._held = text  # may still become the fence
                return ""
            if text.startswith(FENCE):
                text = text[len(FENCE):].lstrip()
            if not text:
                return ""
            self._opening = False
        keep = _TRAILING.search(text)
        assert keep is not None  # the pattern matches the empty end
        self._held = text[keep.start():]
        return text[: keep.start()]

    def finish(self) -> str:
        held, self._held = self._held, ""
        if self._opening:
            return ""
        held = held.rstrip()
        if held.endswith(FENCE_END):
            held = held[: -len(FENCE_END)].rstrip()
        return held
