"""Fill-in-the-middle (infill): the prompt llama-server's ``/infill`` builds, as token ids.

Editors' code completion sends the text before the cursor (the prefix), the text after it (the
suffix) and optionally other files (extra chunks); a model trained for FIM then writes the middle.
``infill_prompt`` lays these out exactly as ``format_prompt_infill`` (tools/server/server-common.cpp
at our pin) does, so that greedy infill here equals llama-server's token for token::

    [FIM_REP]myproject\\n [FIM_SEP]filename0\\n extra0 ... [FIM_SEP]filename\\n
    [BOS] [FIM_PRE]prefix prompt [FIM_SUF]suffix [FIM_MID]

(with ``spm`` the suffix part comes before the prefix part). The prefix keeps its last
3/4·n_batch tokens, the suffix its first n_batch/4 - 2 - len(prompt), and the extra chunks their
last n_ctx - n_batch - 2·n_predict tokens, upstream's budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._exceptions import InvalidConfigError
from ._model import Model

__all__ = ["FimTokens", "fim_tokens", "infill_prompt"]

NULL = -1  # LLAMA_TOKEN_NULL
# upstream writes the chunk separator "\n\n--- snippet ---\n\n" as bytes, "to avoid confusing the AI"
_CHUNK_SEPARATOR = "\n\n--- snippet ---\n\n"


@dataclass(frozen=True)
class FimTokens:
    """A model's FIM token ids (``NULL``, -1, for a role it has no token for)."""

    pre: int
    suf: int
    mid: int
    pad: int
    rep: int
    sep: int


def fim_tokens(model: Model) -> FimTokens:
    """``model``'s FIM tokens; InvalidConfigError when it lacks the prefix, suffix or middle one
    (the model was not trained for infill, or its GGUF does not say which tokens they are)."""
    lib, vocab = model._library.lib, model._vocab_ptr()
    tokens = FimTokens(*(int(getattr(lib, f"llama_vocab_fim_{role}")(vocab))
                         for role in ("pre", "suf", "mid", "pad", "rep", "sep")))
    missing = [name for name, token in (("prefix", tokens.pre), ("suffix", tokens.suf), ("middle", tokens.mid))
               if token == NULL]
    if missing:
        raise InvalidConfigError(
            f"infill is not supported by {model.path.name}: its vocabulary has no FIM {', '.join(missing)} "
            "token (tokenizer.ggml.fim_*_token_id); use a model trained for fill-in-the-middle.")
    return tokens


def _mixed(model: Model, value: Any, name: str) -> list[int]:
    """``value`` (text, or a list of texts and token ids, as upstream's tokenize_mixed takes) as tokens,
    no BOS and special-token text left as text."""
    if isinstance(value, str):
        return model.tokenize(value, add_special=False, parse_special=False)
    if isinstance(value, list):
        tokens: list[int] = []
        for item in value:
            if isinstance(item, str):
                tokens += model.tokenize(item, add_special=False, parse_special=False)
            elif isinstance(item, int) and not isinstance(item, bool):
                tokens.append(item)
            else:
                raise InvalidConfigError(f"{name} must be a string or a list of strings and token ids, "
                                         f"not a list holding {type(item).__name__}.")
        model._check_tokens(tokens)
        return tokens
    raise InvalidConfigError(f"{name} must be a string, not {type(value).__name__}.")


def _extra_chunks(model: Model, fim: FimTokens, extra: Sequence[Mapping[str, Any]]) -> list[int]:
    """The extra files' tokens (the repository and file markers when the model has them)."""
    def text(value: str) -> list[int]:
        return model.tokenize(value, add_special=False, parse_special=False)

    if not isinstance(extra, (list, tuple)):
        raise InvalidConfigError("extra must be a list of {\"text\": str, \"filename\": str} objects.")
    tokens: list[int] = []
    if fim.rep != NULL:
        tokens += [fim.rep, *text("myproject\n")]
    for chunk in extra:
        if not isinstance(chunk, Mapping) or not isinstance(chunk.get("text"), str):
            raise InvalidConfigError("each extra chunk must be an object with a \"text\" string.")
        filename = chunk.get("filename", "tmp")
        if not isinstance(filename, str):
            raise InvalidConfigError("an extra chunk's \"filename\" must be a string.")
        if fim.sep != NULL:
            tokens += [fim.sep, *text(filename + "\n")]
        else:
            tokens += text(_CHUNK_SEPARATOR)
        tokens += text(chunk["text"])
    if fim.sep != NULL:
        tokens += [fim.sep, *text("filename\n")]
    return tokens


def infill_prompt(model: Model, prefix: Any, suffix: Any, *, prompt: str = "",
                  extra: Sequence[Mapping[str, Any]] = (), n_ctx: int, n_batch: int, n_predict: int = -1,
                  spm: bool = False) -> list[int]:
    """The tokens of an infill prompt for ``model``: ``prefix`` and ``suffix`` (text, or lists of texts
    and token ids), ``prompt`` (text the middle starts with; special-token text parsed), ``extra``
    chunks (``{"text": ..., "filename": ...}``, other files for context); ``n_ctx``, ``n_batch`` and
    ``n_predict`` bound how much of each is kept, as upstream's (``n_predict`` is the server's
    default, -1, not a request's). ``spm`` puts the suffix first (llama-server's ``--spm-infill``)."""
    fim = fim_tokens(model)
    if not isinstance(prompt, str):
        raise InvalidConfigError(f"the infill prompt must be a string, not {type(prompt).__name__}.")
    tokens_prefix = _mixed(model, prefix, "prefix")
    tokens_suffix = _mixed(model, suffix, "suffix")
    tokens_prompt = model.tokenize(prompt, add_special=False, parse_special=True)
    extra_tokens = _extra_chunks(model, fim, extra)

    n_prefix_take = min(len(tokens_prefix), 3 * (n_batch // 4))
    n_suffix_take = min(len(tokens_suffix), max(0, n_batch // 4 - (2 + len(tokens_prompt))))
    n_extra_take = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra_tokens))

    head = [fim.pre, *tokens_prefix[len(tokens_prefix) - n_prefix_take:], *tokens_prompt]
    tail = [fim.suf, *tokens_suffix[:n_suffix_take]]
    first, second = (tail, head) if spm else (head, tail)
    if model.add_bos:
        first = [int(model._library.lib.llama_vocab_bos(model._vocab_ptr())), *first]
    kept_extra = extra_tokens[len(extra_tokens) - n_extra_take:]
    return [*kept_extra, *first, *second, fim.mid]
