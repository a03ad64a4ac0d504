"""The library's errors as the command line says them: its advice names the command's flags and commands
(``-n/--max-tokens``, ``-c/--ctx-size``, ``mullama embed``), not the Python API's (``StreamConfig.max_tokens``,
``n_ctx``, ``model.embed``), so that what a message tells a user of the command can be typed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .._exceptions import ContextOverflowError, InvalidConfigError, MullamaError

# What a command's user can do about a context overflow: the flags that make room, by command.
_MORE_ROOM = "shorten the prompt, or give a larger -c/--ctx-size"
OVERFLOW_ADVICE = {"run": _MORE_ROOM, "chat": _MORE_ROOM, "bench": _MORE_ROOM,
                   "embed": "give a larger --batch-size, or --truncate to embed its beginning",
                   "rerank": "give a larger --batch-size, or --truncate to cut it to its beginning"}

# StreamConfig's fields that the sampling flags set (run, chat), by the flag a message names instead.
SAMPLING_FLAGS = {"max_tokens": "-n/--max-tokens", "temperature": "--temp", "seed": "-s/--seed",
                  "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p", "repeat_penalty": "--repeat-penalty"}


def checked_config(flags: Mapping[str, str], **fields: Any) -> Any:
    """``StreamConfig(**fields)``, made from the command's ``flags`` (a field's name -> its flag): a value
    StreamConfig refuses is an InvalidConfigError that names the flag (``-n/--max-tokens must be ...``)."""
    from ..generate._config import StreamConfig, named_for_the_caller

    try:
        return StreamConfig(**fields)
    except InvalidConfigError as error:
        raise InvalidConfigError(named_for_the_caller(error, flags)[0], field=error.field) from None


def command_line_error(error: MullamaError, command: str | None) -> MullamaError:
    """``error`` with the advice a user of ``command`` can follow. A context overflow keeps what did not
    fit (its message up to the first "; ", where the library's advice begins) and names the command's
    flags that make room (``OVERFLOW_ADVICE``)."""
    advice = OVERFLOW_ADVICE.get(command or "")
    if isinstance(error, ContextOverflowError) and advice is not None:
        return ContextOverflowError(f"{str(error).split('; ', 1)[0]}; {advice}.")
    return error


def not_generative(label: str, pooling: str) -> InvalidConfigError:
    """The error for ``run``, ``chat`` or ``bench`` on an embedding model (which cannot generate)."""
    return InvalidConfigError(f"{label} is an embedding model ({pooling} pooling): it cannot generate text. "
                              f"`mullama embed {label} TEXT...` prints its vectors; give a chat model to generate.")
