"""Embeddings over HTTP: OpenAI's ``POST /v1/embeddings`` (its request and response shapes and the
route), and the one ``embed`` that ollama's ``/api/embed`` and ``/api/embeddings`` share. Concurrent requests share
decodes (see mullama.generate._embed)."""

from __future__ import annotations

import array
import sys
import threading
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from .._exceptions import ContextOverflowError, InvalidConfigError, MullamaError, TokenizeError
from ..generate._embed import DEFAULT_BATCH_SIZE
from ..generate._embed import embed as embed_tokens
from ..generate._model import Model
from ._http import (
    MAX_EMBEDDING_INPUTS,
    ServerSettings,
    endpoint,
    json_answer,
    read_json,
    requested_model,
    state,
    until_disconnect,
)
from ._keep_alive import UNSET
from ._openai_shapes import OPENAI
from ._pool import Served
from ._request import APIError, bad, check_fields, generation_error, integer
from ._workers import EMBEDDINGS

__all__ = ["EmbeddingRequest", "decode_for", "embed", "embedding_body", "embeddings", "parse_embedding_request"]

T = TypeVar("T")

EMBEDDING_FIELDS = {"input", "model", "encoding_format", "dimensions", "user"}


@dataclass
class EmbeddingRequest:
    """An embeddings request: texts to tokenise, or token lists given as they are."""

    texts: list[str] | None
    token_lists: list[list[int]] | None
    base64: bool
    dimensions: int | None
    model: str | None = None
    normalize: bool = True  # unit vectors; ollama's legacy /api/embeddings answers the raw ones
    truncate: bool = False  # cut an input longer than the embedding batch to its beginning (ollama's default)


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value)


def parse_embedding_request(body: Any, *, max_inputs: int = MAX_EMBEDDING_INPUTS) -> EmbeddingRequest:
    """Check a ``/v1/embeddings`` body: ``input`` is a string, a list of strings, a list of token ids,
    or a list of such lists; none may be empty."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    check_fields(body, EMBEDDING_FIELDS)
    if "input" not in body:
        raise bad("'input' is required: a string, a list of strings, or lists of token ids.", "input")
    value = body["input"]
    texts: list[str] | None = None
    token_lists: list[list[int]] | None = None
    if isinstance(value, str):
        texts = [value]
    elif _is_token_list(value):
        token_lists = [value]
    elif isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        texts = value
    elif isinstance(value, list) and value and all(_is_token_list(item) for item in value):
        token_lists = value
    elif value == []:
        raise bad("'input' is an empty list; send at least one text.", "input")
    else:
        raise bad("'input' must be a string, a list of strings, a list of token ids, or a list of lists of "
                   "token ids (all non-empty).", "input")
    count = len(texts if texts is not None else token_lists or [])
    if count > max_inputs:
        raise bad(f"'input' has {count} items; at most {max_inputs} fit in one request: send several.", "input")
    if texts is not None and any(not text for text in texts):
        raise bad(f"'input' item {texts.index('')} is an empty string, which has no embedding.", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad("'encoding_format' must be 'float' or 'base64'.", "encoding_format")
    dimensions = integer(body, "dimensions", 1)
    return EmbeddingRequest(texts, token_lists, encoding == "base64", dimensions, requested_model(body))


def embedding_body(vectors: list[list[float]], model: str, prompt_tokens: int, *, base64: bool) -> dict:
    """The ``/v1/embeddings`` response: ``base64`` gives each vector as little-endian float32 bytes."""
    data = []
    for index, vector in enumerate(vectors):
        encoded: list[float] | str = vector
        if base64:
            packed = array.array("f", vector)
            if sys.byteorder == "big":
                packed.byteswap()
            encoded = b64encode(packed.tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def embed(served: Served, parsed: EmbeddingRequest, settings: ServerSettings,
          cancel: threading.Event | None = None) -> tuple[list[list[float]], int]:
    """The request's vectors and its token count (on an embedding worker thread; concurrent requests
    share decodes). Once ``cancel`` is set, the decodes still to come leave this request out."""
    model = served.model
    assert model is not None  # the caller holds a lease
    try:
        if parsed.dimensions is not None and parsed.dimensions != model.n_embd:
            raise APIError(400, f"this model's embeddings have {model.n_embd} dimensions and cannot be "
                                "shortened; leave 'dimensions' out.", param="dimensions")
        if parsed.texts is not None:
            token_lists = [model.tokenize(text, add_special=True, parse_special=True) for text in parsed.texts]
        else:
            token_lists = parsed.token_lists or []
            _check_token_lists(model, token_lists)
        vectors = embed_tokens(model, token_lists, pooling=settings.pooling, batch_size=settings.embedding_batch,
                               normalize=parsed.normalize, truncate=parsed.truncate, cancel=cancel)
        longest = settings.embedding_batch or DEFAULT_BATCH_SIZE  # what a truncated input keeps
        return vectors, sum(min(len(tokens), longest) for tokens in token_lists)
    except ContextOverflowError as exc:
        raise APIError(400, str(exc).replace("text ", "input item ", 1), param="input",
                       code="context_length_exceeded") from None
    except (InvalidConfigError, TokenizeError) as exc:
        raise APIError(400, str(exc).replace("text ", "input item ", 1), param="input") from None
    except MullamaError as exc:
        raise generation_error(exc) from None


def _check_token_lists(model: Model, token_lists: list[list[int]]) -> None:
    """Token arrays must be ``model``'s own ids. Clients that count tokens with another tokenizer send
    theirs (LangChain's OpenAIEmbeddings sends tiktoken's unless ``check_embedding_ctx_length=False``),
    and ids of another vocabulary embed as the wrong text without a word: the ones that cannot be this
    model's (negative, or beyond its vocabulary) are a 400 that says so."""
    for index, tokens in enumerate(token_lists):
        try:
            model._check_tokens(tokens)
        except TokenizeError as exc:
            raise APIError(400, f"'input' item {index} is a token array that cannot be this model's: {exc} "
                                "Token arrays must be ids of this model's own tokenizer, not another's (such as "
                                "tiktoken's); send the text instead (LangChain's OpenAIEmbeddings: pass "
                                "check_embedding_ctx_length=False).", param="input") from None


async def decode_for(request: Request, work: Callable[[threading.Event], T]) -> T:
    """``work(cancel)``, a request's embedding (or rerank) decodes, on an embedding worker thread, so that
    they never hold up other kinds of work (see _workers); counted in the metrics. ``cancel`` is set
    when the client goes away, or the awaiting task is cancelled: the work stops at its next decode."""
    metrics = state(request).metrics
    cancel = threading.Event()

    def counted() -> T:
        with metrics.embedding_lock:
            metrics.embedding_running += 1
        try:
            return work(cancel)
        except BaseException:
            if cancel.is_set():
                with metrics.embedding_lock:
                    metrics.embedding_cancelled += 1
            raise
        finally:
            with metrics.embedding_lock:
                metrics.embedding_running -= 1

    metrics.embedding_requests += 1
    try:
        return await until_disconnect(request, EMBEDDINGS.run(counted), cancel.set)
    finally:
        metrics.embedding_requests -= 1


async def embed_request(request: Request, parsed: EmbeddingRequest, *, keep_alive: float | None = UNSET
                        ) -> tuple[str, list[list[float]], int]:
    """Lease the model the request names and embed its input: (model name, vectors, tokens).
    ``keep_alive`` (ollama's, parsed) replaces the model's own from then on."""
    server = state(request)
    async with await server.pool.lease(parsed.model, keep_alive=keep_alive) as served:
        vectors, n_tokens = await decode_for(request, lambda cancel: embed(served, parsed, server.settings, cancel))
    return served.spec.name, vectors, n_tokens


@endpoint(OPENAI)
async def embeddings(request: Request) -> Response:
    server = state(request)
    parsed = parse_embedding_request(await read_json(request), max_inputs=server.settings.max_embedding_inputs)
    name, vectors, n_tokens = await embed_request(request, parsed)
    return await json_answer(lambda: embedding_body(vectors, name, n_tokens, base64=parsed.base64), workers=EMBEDDINGS)
