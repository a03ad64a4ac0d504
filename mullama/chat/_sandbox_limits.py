"""The chat-template sandbox's limits, and what one render has spent against them.

A template comes from a model file, which may be hostile; ``_sandbox`` stops it before it goes past
one of these. This module holds the numbers, the budget of the render under way (a context
variable, so that every check finds it) and the checks the other sandbox modules share. Each breach
raises TemplateError naming the constant:

- time: MAX_RENDER_SECONDS of wall clock per render, checked at every loop iteration,
  call, filter, item lookup and output chunk;
- work: MAX_LOOP_ITERATIONS for-loop iterations per render, all loops together, and
  MAX_TEMPLATE_CHARS of template source (compiled once per template);
- both grow with the conversation, by SECONDS_PER_MESSAGE_PAIR and one iteration for each
  pair of messages (n * (n - 1) for n messages), because real templates may compare every
  message with every earlier one (Gemma 4's does: 1,400 messages are 980,000 iterations); a
  hostile template can thus spend on a conversation what such a template would, no more;
- size: MAX_OUTPUT_CHARS characters for the prompt and for any one string a template
  builds, MAX_ITEMS items for ``range()`` and any one list, MAX_INT_BITS bits for
  integers built with ``*`` and ``**``;
- memory: MAX_RENDER_MEMORY of growth of the process's anonymous memory during a render,
  measured (``/proc/self/statm``) after every MEMORY_CHECK_EVERY characters and items of
  new strings and lists the template builds; so a template that rebuilds a growing string
  (Reka-Edge's appends each message to ``ns.out``) churns freely, and one that keeps copies
  is stopped. Without ``/proc`` (not Linux), what the template built counts as if it all
  stayed alive.
"""

from __future__ import annotations

import mmap
import time
from contextvars import ContextVar
from typing import Any

from .._exceptions import TemplateError

__all__ = ["BUDGET", "BUILT", "MAX_INT_BITS", "MAX_ITEMS", "MAX_JSON_INDENT", "MAX_LOOP_ITERATIONS",
           "MAX_OUTPUT_CHARS", "MAX_RENDER_MEMORY", "MAX_RENDER_SECONDS", "MAX_TEMPLATE_CHARS",
           "MEMORY_CHECK_EVERY", "SECONDS_PER_MESSAGE_PAIR", "SEQUENCES", "SLOW_FILTER_INPUT", "Budget",
           "check_chars", "check_items", "check_width", "count_built", "over"]

# Why these values: the 70 upstream templates (llama.cpp's models/templates) render a short
# conversation with at most 12 loop iterations and 25,000 characters and items of new strings and
# lists; a 401-message, 2-million-character one in at most 0.9 s with at most 81,000 iterations
# (Gemma 4) and 814 million characters built and freed again (Reka-Edge rebuilds its prompt at
# each message, so its memory barely grows); their sources are at most 17 KB. Each limit leaves
# a margin of orders of magnitude; a conversation that reaches one is far past any model's context.
MAX_OUTPUT_CHARS = 10_000_000       # the rendered prompt, and any one string a template builds
MAX_ITEMS = 100_000                 # range() (jinja's own default), and any one list, tuple or dict
MAX_LOOP_ITERATIONS = 1_000_000     # for-loop iterations in one render, all loops together (+ n*(n-1))
MAX_RENDER_MEMORY = 128 * 2**20     # growth of anonymous memory during one render
MEMORY_CHECK_EVERY = 4_000_000      # measured after this many characters and items of new strings and lists
MAX_INT_BITS = 65_536               # integers built with * and ** (Python prints at most 4,300 digits)
MAX_RENDER_SECONDS = 2.0            # wall clock for one render (+ n*(n-1) * SECONDS_PER_MESSAGE_PAIR)
SECONDS_PER_MESSAGE_PAIR = 2e-6     # Gemma 4's template needs 0.7 us per pair here (1,400 messages: 1.4 s)
MAX_TEMPLATE_CHARS = 200_000        # the template's source (compiling costs ~15 ms per KiB; done once)
MAX_JSON_INDENT = 100               # tojson(indent=...)
# Filters that do per-character Python work on their input: at most this much input, so that
# one call stays well under a second (striptags is quadratic in markupsafe 3.0).
SLOW_FILTER_INPUT = {"striptags": 100_000, "urlize": 100_000, "title": 1_000_000,
                     "wordwrap": 1_000_000, "urlencode": 1_000_000, "pprint": 1_000_000}

SEQUENCES = (str, bytes, list, tuple)
BUILT = (str, bytes, list, tuple, dict)  # what counts towards MEMORY_CHECK_EVERY (by its len())


def over(limit: str, name: str) -> TemplateError:
    return TemplateError(f"the chat template went over a safety limit: {limit} ({name}). No real chat "
                         "template needs that much; the model file's template is broken or hostile.")


class Budget:
    """What one render has spent: time, loop iterations, new strings and lists."""

    __slots__ = ("baseline", "built", "deadline", "iterations", "max_iterations", "next_check", "seconds")

    def __init__(self, messages: int = 0) -> None:
        pairs = messages * (messages - 1)
        self.seconds = MAX_RENDER_SECONDS + pairs * SECONDS_PER_MESSAGE_PAIR
        self.deadline = time.monotonic() + self.seconds
        self.iterations = 0
        self.max_iterations = MAX_LOOP_ITERATIONS + pairs
        self.built = 0  # characters and items of new strings and lists, freed or not
        self.next_check = MEMORY_CHECK_EVERY
        self.baseline: int | None = None  # anonymous memory before the render, once measured

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise over(f"more than {self.seconds:.3g} s of rendering", "MAX_RENDER_SECONDS")

    def check_iterations(self) -> None:
        if self.iterations > self.max_iterations:
            raise over(f"more than {self.max_iterations:,} loop iterations", "MAX_LOOP_ITERATIONS")
        self.tick()

    def build(self, size: int) -> None:
        self.built += size
        if self.built > self.next_check:
            self.check_memory()

    def check_memory(self) -> None:
        self.next_check = self.built + MEMORY_CHECK_EVERY
        now = _anonymous_memory()
        if now is None:
            grown = self.built  # no /proc: as if everything built were still alive (a byte each)
        else:
            if self.baseline is None:  # first measured now: as if everything built so far were alive
                self.baseline = now - self.built
            grown = now - self.baseline
        if grown > MAX_RENDER_MEMORY:
            raise over(f"more than {MAX_RENDER_MEMORY // 2**20} MiB of memory", "MAX_RENDER_MEMORY")


def _anonymous_memory() -> int | None:
    """This process's resident anonymous memory (not the mapped model file), or None without /proc."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            fields = statm.read().split()
        return (int(fields[1]) - int(fields[2])) * mmap.PAGESIZE  # resident - shared (file-backed)
    except (OSError, ValueError, IndexError):
        return None


# The budget of the render running in this thread (None outside a render, e.g. while compiling).
BUDGET: ContextVar[Budget | None] = ContextVar("mullama_template_budget", default=None)


def count_built(value: Any) -> None:
    budget = BUDGET.get()
    if budget is not None:
        budget.build(len(value))


def check_chars(size: int, what: str) -> None:
    if size > MAX_OUTPUT_CHARS:
        raise over(f"{what} would make a string of more than {MAX_OUTPUT_CHARS:,} characters",
                   "MAX_OUTPUT_CHARS")


def check_items(size: int, what: str) -> None:
    if size > MAX_ITEMS:
        raise over(f"{what} would make more than {MAX_ITEMS:,} items", "MAX_ITEMS")


def check_width(width: Any, what: str) -> None:
    if isinstance(width, int) and width > MAX_OUTPUT_CHARS:
        check_chars(width, what)

