"""Embeddings over HTTP: OpenAI's ``POST /v1/embeddings`` (its request and response shapes and the
route), and the one ``embed`` that ollama's ``/api/embed`` and ``/api/embeddings`` share. Concurrent requests share
decodes (see mullama.generate._embed)."""

from __future__ import annotations

import array
import asyncio
import sys
from base64 import b64encode
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._exceptions import ContextOverflowError, InvalidConfigError, MullamaError, TokenizeError
from ..generate._embed import DEFAULT_BATCH_SIZE
from ..generate._model import Model
from ._http import MAX_EMBEDDING_INPUTS, ServerSettings, endpoint, read_json, requested_model, state
from ._keep_alive import UNSET
from ._openai_shapes import OPENAI
from ._pool import Served
from ._request import APIError, bad, generation_error, integer

__all__ = ["EmbeddingRequest", "embed", "embedding_body", "embeddings", "parse_embedding_request"]

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
    unknown = sorted(set(body) - EMBEDDING_FIELDS)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
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


def embed(served: Served, parsed: EmbeddingRequest, settings: ServerSettings) -> tuple[list[list[float]], int]:
    """The request's vectors and its token count (in a worker thread; concurrent requests share decodes)."""
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
        vectors = model.embed(token_lists, pooling=settings.pooling, batch_size=settings.embedding_batch,
                              normalize=parsed.normalize, truncate=parsed.truncate)
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


async def embed_request(request: Request, parsed: EmbeddingRequest, *, keep_alive: float | None = UNSET
                        ) -> tuple[str, list[list[float]], int]:
    """Lease the model the request names and embed its input: (model name, vectors, tokens).
    ``keep_alive`` (ollama's, parsed) replaces the model's own from then on."""
    server = state(request)
    async with await server.pool.lease(parsed.model, keep_alive=keep_alive) as served:
        vectors, n_tokens = await asyncio.to_thread(embed, served, parsed, server.settings)
    return served.spec.name, vectors, n_tokens


@endpoint(OPENAI)
async def embeddings(request: Request) -> Response:
    server = state(request)
    parsed = parse_embedding_request(await read_json(request), max_inputs=server.settings.max_embedding_inputs)
    name, vectors, n_tokens = await embed_request(request, parsed)
    return JSONResponse(embedding_body(vectors, name, n_tokens, base64=parsed.base64))
