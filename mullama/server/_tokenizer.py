"""The model's tokenizer and template over HTTP, in llama-server's shapes and vLLM's (which evaluation
harnesses such as lm-eval probe for: ``GET /tokenizer_info``, then ``/tokenize`` with a ``prompt``).

- ``POST /tokenize``: llama-server's ``{"content", "add_special" (false), "parse_special" (true),
  "with_pieces" (false)}`` answered ``{"tokens": [...]}`` (with pieces, ``[{"id", "piece"}]``, a piece
  that is not whole UTF-8 given as its byte values); ``content`` may mix strings and token ids, as
  llama-server's. vLLM's ``{"prompt", "add_special_tokens" (true), "return_token_strs"}`` or ``{"messages",
  "add_generation_prompt" (true), "add_special_tokens" (false)}`` answered ``{"count", "max_model_len",
  "tokens", "token_strs"}``. vLLM's special-token text is always read as its token (Hugging Face
  tokenizers do so); llama-server's as ``parse_special`` says.
- ``POST /detokenize``: ``{"tokens"}`` answered ``{"content", "prompt"}`` (llama-server's name, vLLM's):
  each token's piece with special tokens written out, as llama-server joins them.
- ``POST /apply-template``: an OpenAI chat body answered ``{"prompt"}``: the text the template makes of it.
- ``GET /props``: llama-server's description of the server (context per slot, slots, template,
  BOS/EOS text, modalities, build).
- ``GET /tokenizer_info``: vLLM's: the special tokens' text, the chat template, the longest prompt.

Each takes the served model's name in ``model`` (the body's, or the query's for the GETs); none
generates. Errors are llama-server's shape.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .._exceptions import MullamaError
from ..generate._model import Model
from ._generation import rendered_prompt
from ._http import endpoint, json_answer, read_object, requested_model, state
from ._llama_server_shapes import LLAMA_SERVER
from ._openai import parse_request
from ._pool import Served
from ._request import APIError, bad, boolean
from ._workers import ADMIN

__all__ = ["apply_template", "detokenize", "props", "tokenize", "tokenizer_info"]


def _mixed_tokens(model: Model, content: Any, add_special: bool, parse_special: bool) -> list[int]:
    """llama-server's ``tokenize_mixed``: a string, or a list of strings and token ids, in order (only the
    first string gets BOS)."""
    if isinstance(content, str):
        return model.tokenize(content, add_special=add_special, parse_special=parse_special)
    if not isinstance(content, list):
        raise bad("\"content\" must be a string or a list of strings and token ids", "content")
    tokens: list[int] = []
    for index, part in enumerate(content):
        if isinstance(part, str):
            tokens += model.tokenize(part, add_special=add_special and index == 0, parse_special=parse_special)
        elif isinstance(part, int) and not isinstance(part, bool):
            tokens += model._check_tokens([part])
        else:
            raise bad("\"content\" must be a string or a list of strings and token ids", "content")
    return tokens


def _piece(model: Model, token: int) -> str | list[int]:
    """A token's text with special tokens written out; bytes that are not whole UTF-8, as their values."""
    raw = model.token_to_piece(token, special=True)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


def _tokenize(served: Served, body: dict, settings: Any) -> dict:
    model = served.model
    assert model is not None  # the caller holds a lease
    try:
        if "content" in body:  # llama-server's
            tokens = _mixed_tokens(model, body["content"], boolean(body, "add_special", False),
                                   boolean(body, "parse_special", True))
            if boolean(body, "with_pieces", False):
                return {"tokens": [{"id": token, "piece": _piece(model, token)} for token in tokens]}
            return {"tokens": tokens}
        if "messages" in body:  # vLLM's, for a chat
            if not boolean(body, "add_generation_prompt", True):
                raise bad("only add_generation_prompt: true (the assistant's turn opened) is supported",
                          "add_generation_prompt")
            text = _template_text(served, {"messages": body["messages"]}, settings)
            tokens = model.tokenize(text, add_special=boolean(body, "add_special_tokens", False), parse_special=True)
        elif "prompt" in body:  # vLLM's
            if not isinstance(body["prompt"], str):
                raise bad("\"prompt\" must be a string", "prompt")
            tokens = model.tokenize(body["prompt"], add_special=boolean(body, "add_special_tokens", True),
                                    parse_special=True)
        else:
            return {"tokens": []}  # as llama-server answers a body without content
    except MullamaError as exc:
        raise APIError(400, str(exc), param="content") from None
    strings = [model.token_to_piece(token, special=True).decode("utf-8", "replace") for token in tokens] \
        if boolean(body, "return_token_strs", False) else None
    return {"count": len(tokens), "max_model_len": served.context_length or model.n_ctx_train, "tokens": tokens,
            "token_strs": strings}


def _template_text(served: Served, body: dict, settings: Any) -> str:
    """The prompt an OpenAI chat body makes through the served model's template (media as markers)."""
    parsed = parse_request(body, "chat", max_tokens_limit=settings.max_tokens_limit)
    prompt, _config = rendered_prompt(served, parsed, settings, media=False)
    assert isinstance(prompt, str)
    return prompt


def _detokenize(served: Served, body: dict) -> dict:
    model = served.model
    assert model is not None  # the caller holds a lease
    tokens = body.get("tokens", [])
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("\"tokens\" must be a list of token ids", "tokens")
    try:
        model._check_tokens(tokens)
    except MullamaError as exc:
        raise APIError(400, str(exc), param="tokens") from None
    text = b"".join(model.token_to_piece(token, special=True) for token in tokens).decode("utf-8", "replace")
    return {"content": text, "prompt": text}


def _props(served: Served) -> dict:
    from .._bindings import LLAMA_CPP_COMMIT  # loaded with the library (a source checkout's bindings/ too)

    model = served.model
    assert model is not None  # the caller holds a lease
    return {
        "default_generation_settings": {"n_ctx": served.context_length},
        "total_slots": served.engine.parallel if served.engine is not None else 0,
        "model_alias": served.spec.name,
        "model_path": str(model.path),
        "modalities": {"vision": model.supports_vision, "video": False, "audio": model.supports_audio},
        "chat_template": model.chat_template or "",
        "bos_token": model._special_text(model.bos_token_id),
        "eos_token": model._special_text(model.eos_token_id),
        "build_info": f"mullama (llama.cpp {LLAMA_CPP_COMMIT[:12]})",
        "is_sleeping": False,
        "endpoint_slots": True,
        "endpoint_props": False,
        "endpoint_metrics": True,
    }


def _tokenizer_info(served: Served) -> dict:
    model = served.model
    assert model is not None  # the caller holds a lease
    return {"tokenizer_class": "llama.cpp", "bos_token": model._special_text(model.bos_token_id) or None,
            "eos_token": model._special_text(model.eos_token_id) or None, "pad_token": None,
            "add_bos_token": model.add_bos, "chat_template": model.chat_template,
            "model_max_length": served.context_length or model.n_ctx_train}


async def _answer(request: Request, name: str | None, work: Any) -> Response:
    """``work(served)`` on an admin worker thread, with the named model leased (loaded if need be)."""
    async with await state(request).pool.lease(name) as served:
        result = await ADMIN.run(work, served)
    return await json_answer(lambda: result)


@endpoint(LLAMA_SERVER)
async def tokenize(request: Request) -> Response:
    body, settings = await read_object(request), state(request).settings
    return await _answer(request, requested_model(body), lambda served: _tokenize(served, body, settings))


@endpoint(LLAMA_SERVER)
async def detokenize(request: Request) -> Response:
    body = await read_object(request)
    return await _answer(request, requested_model(body), lambda served: _detokenize(served, body))


@endpoint(LLAMA_SERVER)
async def apply_template(request: Request) -> Response:
    body, settings = await read_object(request), state(request).settings
    return await _answer(request, requested_model(body),
                         lambda served: {"prompt": _template_text(served, body, settings)})


@endpoint(LLAMA_SERVER)
async def props(request: Request) -> Response:
    return await _answer(request, request.query_params.get("model"), _props)


@endpoint(LLAMA_SERVER)
async def tokenizer_info(request: Request) -> Response:
    return await _answer(request, request.query_params.get("model"), _tokenizer_info)
