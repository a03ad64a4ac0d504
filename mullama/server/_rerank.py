"""llama-server's reranking routes (``POST /rerank``, ``/reranking``, ``/v1/rerank``, ``/v1/reranking``), in its shape.

The request is Jina's and Cohere's, as llama-server reads it: ``query`` (a string), ``documents`` (a
non-empty array: strings, or, as Jina and Cohere also send them, objects with a ``text``),
``top_n`` (how many results, default all), ``return_documents`` (each result then carries its
``document: {"text"}``, as Jina and Cohere answer), ``model``. The answer is llama-server's:
``{"model", "object": "list", "usage": {"prompt_tokens", "total_tokens"}, "results": [{"index",
"relevance_score"}]}``, most relevant first. A body with ``texts`` instead of ``documents`` is
Hugging Face TEI's ``/rerank``, answered as llama-server answers it: a bare array of ``{"index",
"score"}`` (with ``"text"`` when ``return_text`` is true). Scores are the raw output of the model's
classification head, as llama-server's; pairs are built and scored by ``generate._rerank``.

Errors are llama-server's ``{"error": {"code", "message", "type"}}``. A model whose GGUF does not
ask for rank pooling is a 501 ``not_supported_error``, as llama-server answers when it was not
started with ``--rerank`` (mullama's ``--rerank`` is accepted for llama-server's command lines; a
reranking GGUF is served for reranking without it, and embeddings stay on).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .._exceptions import ContextOverflowError, InvalidConfigError, MullamaError, TokenizeError
from ..generate._rerank import rank_tokens, scores
from ._embeddings import decode_for
from ._http import endpoint, json_answer, read_object, requested_model, state
from ._llama_server_shapes import LLAMA_SERVER
from ._pool import Served
from ._request import APIError, bad, generation_error
from ._workers import EMBEDDINGS

__all__ = ["RerankRequest", "parse_rerank", "rerank", "rerank_body"]


@dataclass
class RerankRequest:
    query: str
    documents: list[str]
    top_n: int | None
    return_documents: bool
    tei: bool  # the body named its documents ``texts``: Hugging Face TEI's shape
    model: str | None


def _document_text(item: Any, index: int, field: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return str(item["text"])
    raise bad(f"\"{field}\" item {index} must be a string or an object with a string \"text\"", field)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise bad(f"\"{name}\" must be true or false", name)
    return value


def parse_rerank(body: dict, *, max_documents: int) -> RerankRequest:
    """Check a rerank body as llama-server does (and Jina's and Cohere's object documents)."""
    if "query" not in body:
        raise bad("\"query\" must be provided", "query")
    query = body["query"]
    if not isinstance(query, str):
        raise bad("\"query\" must be a string", "query")
    tei = "texts" in body and "documents" not in body
    field = "texts" if tei else "documents"
    value = body.get(field)
    if not isinstance(value, list) or not value:
        raise bad(f"\"{field}\" must be a non-empty string array", field)
    if len(value) > max_documents:
        raise bad(f"\"{field}\" has {len(value)} items; at most {max_documents} fit in one request: send several.",
                  field)
    documents = [_document_text(item, index, field) for index, item in enumerate(value)]
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise bad("\"top_n\" must be a positive integer", "top_n")
    return_documents = _flag(body, "return_text" if tei else "return_documents")
    return RerankRequest(query, documents, top_n, return_documents, tei, requested_model(body))


def score(served: Served, parsed: RerankRequest, batch_size: int | None,
          cancel: threading.Event | None = None) -> tuple[list[float], int]:
    """Each document's score and the tokens evaluated (on an embedding worker thread; requests share
    decodes; ``cancel`` as for embeddings)."""
    model = served.model
    assert model is not None  # the caller holds a lease
    if model.pooling != "rank":
        raise APIError(501, "This server does not support reranking: its model's GGUF asks for "
                            f"{model.pooling or 'no'} pooling, not rank; serve a reranking model.",
                       type="not_supported_error")
    try:
        token_lists = [rank_tokens(model, parsed.query, document) for document in parsed.documents]
        values = scores(model, token_lists, batch_size=batch_size, cancel=cancel)
    except (ContextOverflowError, InvalidConfigError, TokenizeError) as exc:
        raise APIError(400, str(exc).replace("document ", f"{'texts' if parsed.tei else 'documents'} item ", 1),
                       param="documents") from None
    except MullamaError as exc:
        raise generation_error(exc) from None
    return values, sum(len(tokens) for tokens in token_lists)


def rerank_body(parsed: RerankRequest, values: list[float], model: str, n_tokens: int) -> Any:
    """llama-server's answer (format_response_rerank): results by score, highest first, cut to top_n."""
    label = "score" if parsed.tei else "relevance_score"
    order = sorted(range(len(values)), key=lambda index: -values[index])[:parsed.top_n]
    results: list[dict[str, Any]] = []
    for index in order:
        result: dict[str, Any] = {"index": index, label: values[index]}
        if parsed.return_documents:
            text = parsed.documents[index]
            if parsed.tei:
                result["text"] = text
            else:
                result["document"] = {"text": text}
        results.append(result)
    if parsed.tei:
        return results
    return {"model": parsed.model or model, "object": "list",
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}, "results": results}


@endpoint(LLAMA_SERVER)
async def rerank(request: Request) -> Response:
    server = state(request)
    parsed = parse_rerank(await read_object(request), max_documents=server.settings.max_embedding_inputs)
    async with await server.pool.lease(parsed.model) as served:
        values, n_tokens = await decode_for(
            request, lambda cancel: score(served, parsed, server.settings.embedding_batch, cancel))
    return await json_answer(lambda: rerank_body(parsed, values, served.spec.name, n_tokens), workers=EMBEDDINGS)
