"""The types of the public API's arguments, checked where a wrong one would otherwise fail deep inside
(pathlib, memoryview, cffi, ``dict()``) with a bare TypeError or ValueError: it is an InvalidConfigError
(INVALID_CONFIG) that names the argument and the type it takes, raised before any work is done."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .._exceptions import InvalidConfigError, TokenizeError
from ._config import MAX_SEED

__all__ = ["check_bytes", "check_kwargs", "check_path", "check_seed", "check_token_id", "check_token_ids", "wrong_type"]


def wrong_type(name: str, value: Any, expected: str) -> InvalidConfigError:
    """The error for argument ``name`` given ``value`` where it takes ``expected`` (words: "a str")."""
    shown = "None" if value is None else f"{type(value).__name__} {repr(value)[:60]}"
    return InvalidConfigError(f"{name} must be {expected}, not {shown}.")


def check_path(name: str, value: Any) -> Path:
    """``value`` as a Path, when it is a file's path (a str or an os.PathLike)."""
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise wrong_type(name, value, "a file's path (a str or an os.PathLike)")


def check_bytes(name: str, value: Any) -> None:
    """``value`` must be a bytes-like buffer (bytes, bytearray or memoryview)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise wrong_type(name, value, "bytes (or a bytearray or memoryview)")


def check_kwargs(name: str, value: Any) -> dict[str, Any]:
    """A copy of ``value``, keyword arguments (such as ``chat_template_kwargs``): None or a dict with str keys."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise wrong_type(name, value, "a dict with str keys (or None)")
    return dict(value)


def check_token_id(token: Any, n_vocab: int) -> None:
    """A token id is an int (InvalidConfigError) of the vocabulary's, 0 to ``n_vocab`` - 1 (TokenizeError:
    llama.cpp throws through its C API, aborting the process, for one out of range)."""
    if not isinstance(token, int):
        raise wrong_type("a token id", token, "an int")
    if not 0 <= token < n_vocab:
        raise TokenizeError(f"token id {token!r} is out of range for this model (0..{n_vocab - 1}).")


def check_token_ids(tokens: Any, n_vocab: int, name: str = "tokens") -> list[int]:
    """``tokens`` as a list, when it is an iterable of token ids (``check_token_id``) and not text."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
        raise wrong_type(name, tokens, "a list of int token ids")
    ids: list[int] = list(tokens)
    for token in ids:
        check_token_id(token, n_vocab)
    return ids


def check_seed(seed: Any) -> None:
    """A sampling seed: None (a random one) or an integer from 0 to MAX_SEED."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise InvalidConfigError(f"seed must be an integer from 0 to {MAX_SEED}, not {seed!r}.")
