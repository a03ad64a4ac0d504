"""Reranking: a relevance score per (query, document) pair, computed as llama-server's ``/rerank``.

A reranker is a cross-encoder: the query and one document go through the model together, and its
classification head (rank pooling, ``LLAMA_POOLING_TYPE_RANK``) turns the pooled state into a score.
Each pair is tokenised as llama-server's ``format_prompt_rerank`` builds it at our pin
(tools/server/server-common.cpp): with the GGUF's ``rerank`` chat template
(``tokenizer.chat_template.rerank``), its ``{query}`` and ``{document}`` replaced and special
tokens parsed; otherwise BOS, the query, EOS (SEP when there is no EOS), SEP, the document, EOS,
each special token only where the vocabulary adds it (``llama_vocab_get_add_bos/eos/sep``). The
pairs then go through the embedding machinery (``_embed.Embedder``) with rank pooling, so they
share decodes exactly as embeddings do, and each score equals the one llama-server gives for its
pair alone. The score is the head's first output, raw as llama-server answers it; ``normalize``
maps it through the logistic function to (0, 1), as a single-label cross-encoder's probability
(the order does not change).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._exceptions import ContextOverflowError, InvalidConfigError
from ._embed import DEFAULT_BATCH_SIZE, POOLING_RANK, check_options, fit

if TYPE_CHECKING:
    from ._model import Model

__all__ = ["Ranked", "rank_tokens", "rerank", "scores"]

MAX_DOCUMENTS = 1 << 16


@dataclass(frozen=True)
class Ranked:
    """One document's place in a ranking: its ``index`` in the documents given, its ``score``
    (higher is more relevant) and its text."""

    index: int
    score: float
    document: str


def check_reranker(model: Model) -> None:
    """A model whose GGUF does not ask for rank pooling has no classification head to score with:
    INVALID_CONFIG (llama-server answers 501 unless started with ``--rerank``)."""
    if model.pooling != "rank":
        raise InvalidConfigError(f"this model cannot rerank: its GGUF's pooling is {model.pooling or 'none'}, not "
                                 "rank (a reranker, a cross-encoder with a classification head, declares "
                                 "<arch>.pooling_type = 4); load a reranking model.")


def rank_tokens(model: Model, query: str, document: str) -> list[int]:
    """The tokens of one (query, document) pair, as llama-server's format_prompt_rerank builds them."""
    template = _rerank_template(model)
    if template is not None:
        prompt = template.replace("{query}", query).replace("{document}", document)
        return model.tokenize(prompt, add_special=False, parse_special=True)
    lib = model._library.lib
    vocab = model._vocab_ptr()
    eos = lib.llama_vocab_eos(vocab)
    if eos < 0:  # LLAMA_TOKEN_NULL
        eos = lib.llama_vocab_sep(vocab)
    add_eos, add_sep = bool(lib.llama_vocab_get_add_eos(vocab)), bool(lib.llama_vocab_get_add_sep(vocab))
    tokens: list[int] = [lib.llama_vocab_bos(vocab)] if lib.llama_vocab_get_add_bos(vocab) else []
    tokens += model.tokenize(query, add_special=False, parse_special=False)
    tokens += [eos] if add_eos else []
    tokens += [lib.llama_vocab_sep(vocab)] if add_sep else []
    tokens += model.tokenize(document, add_special=False, parse_special=False)
    tokens += [eos] if add_eos else []
    return tokens


def _rerank_template(model: Model) -> str | None:
    ffi = model._ffi
    ptr = model._library.lib.llama_model_chat_template(model.ptr, b"rerank")
    return None if ptr == ffi.NULL else str(ffi.string(ptr).decode("utf-8", "replace"))


def check_inputs(query: Any, documents: Any, top_n: Any) -> list[str]:
    """The documents as a list of str, after checking the query, the documents and ``top_n``."""
    if not isinstance(query, str):
        raise InvalidConfigError(f"the query must be a str, not {type(query).__name__}.")
    if isinstance(documents, (str, bytes, bytearray)) or not isinstance(documents, Sequence):
        raise InvalidConfigError(f"documents must be a list of str, not {type(documents).__name__}.")
    items = list(documents)
    if not items:
        raise InvalidConfigError("rerank() was given no documents; pass a non-empty list of str.")
    if len(items) > MAX_DOCUMENTS:
        raise InvalidConfigError(f"rerank() was given {len(items)} documents; at most {MAX_DOCUMENTS} at once.")
    for index, document in enumerate(items):
        if not isinstance(document, str):
            raise InvalidConfigError(f"document {index} is a {type(document).__name__}, not a str.")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InvalidConfigError(f"top_n must be a positive int or None (every document), not {top_n!r}.")
    return items


def scores(model: Model, token_lists: list[list[int]], *, batch_size: int | None = None,
           truncate: bool = False, cancel: threading.Event | None = None) -> list[float]:
    """The raw rank score of each pair's tokens, in order (the model is checked by the caller);
    ``cancel`` as for Embedder.run."""
    size = batch_size or DEFAULT_BATCH_SIZE
    try:
        fitted = [fit(tokens, index, size, truncate) for index, tokens in enumerate(token_lists)]
    except ContextOverflowError as exc:
        raise ContextOverflowError(str(exc).replace("text ", "the query with document ", 1)) from None
    raw = model._embedder(POOLING_RANK, size).run(fitted, cancel)
    return [float(memoryview(vectors[0]).cast("f")[0]) for vectors in raw]


def rerank(model: Model, query: str, documents: Sequence[str], *, top_n: int | None = None,
           normalize: bool = False, batch_size: int | None = None, truncate: bool = False) -> list[Ranked]:
    """What :meth:`mullama.Model.rerank` returns (see there)."""
    items = check_inputs(query, documents, top_n)
    check_options(normalize, batch_size, truncate)
    check_reranker(model)
    values = scores(model, [rank_tokens(model, query, document) for document in items],
                    batch_size=batch_size, truncate=truncate)
    if normalize:
        values = [_logistic(value) for value in values]
    ranked = sorted((Ranked(index, value, items[index]) for index, value in enumerate(values)),
                    key=lambda item: -item.score)  # stable: equal scores keep the documents' order
    return ranked[:top_n] if top_n is not None else ranked


def _logistic(value: float) -> float:
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp = math.exp(value)
    return exp / (1.0 + exp)
