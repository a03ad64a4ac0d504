"""llama-server's ``POST /infill`` (fill-in-the-middle, for editors' code completion), in its shape.

The request is llama-server's: ``input_prefix`` and ``input_suffix`` (required), ``input_extra``
(other files: ``[{"filename", "text"}]``), ``prompt`` (text the middle starts with), and the sampling
fields of its ``/completion`` (``n_predict``, ``temperature``, ``top_k``, ``stop``, ...); fields it
does not know are ignored, as llama-server ignores them (editor plugins such as llama.vscode send
their own). The prompt is built as llama-server builds it (``generate._infill``); the answer is its
``/completion`` body, or with ``stream`` its server-sent events (one per token, then the final body;
no ``[DONE]``). Errors are llama-server's ``{"error": {"code", "message", "type"}}``; a model without
FIM tokens is a 400 (llama-server answers 501).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from .._exceptions import InvalidConfigError, MullamaError, TokenizeError
from ..generate._config import StreamConfig
from ..generate._engine import EngineRequest
from ..generate._infill import fim_tokens, infill_prompt
from ._generation import _submit
from ._http import endpoint, read_object, requested_model, state, stream_or_collect, submit_in_all
from ._llama_server_shapes import LLAMA_SERVER
from ._lora import parse_lora
from ._pool import Served
from ._request import APIError, bad, capped_max_tokens, config_error, integer, number, requested_slot

__all__ = ["infill", "parse_infill"]

MAX_STOPS = 16
# StreamConfig field -> llama-server's request field that set it, as errors name it (see config_error)
FIELD_NAMES = {"max_tokens": "n_predict", "stop_sequences": "stop"}


@dataclass
class InfillRequest:
    prefix: Any  # text, or a list of texts and token ids
    suffix: Any
    extra: list[dict[str, Any]]
    prompt: str
    config: StreamConfig
    stream: bool
    return_tokens: bool
    model: str | None
    id_slot: int | None


def _text_or_mixed(body: dict, name: str) -> Any:
    if name not in body:
        raise bad(f"\"{name}\" is required", name)
    value = body[name]
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(item, str) or (isinstance(item, int) and not isinstance(item, bool))
                                       for item in value):
        return value
    raise bad(f"\"{name}\" must be a string or a list of strings and token ids", name)


def parse_infill(body: dict, *, max_tokens_limit: int) -> InfillRequest:
    """Check an ``/infill`` body as llama-server does; the sampling fields become a StreamConfig."""
    prefix, suffix = _text_or_mixed(body, "input_prefix"), _text_or_mixed(body, "input_suffix")
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise bad("\"prompt\" must be a string", "prompt")
    extra = body.get("input_extra", [])
    if not isinstance(extra, list):
        raise bad("\"input_extra\" must be an array of {\"filename\": string, \"text\": string}", "input_extra")
    for chunk in extra:
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
            raise bad("extra_context chunk must contain a \"text\" field with a string value", "input_extra")
        if "filename" in chunk and not isinstance(chunk["filename"], str):
            raise bad("extra_context chunk's \"filename\" field must be a string", "input_extra")
    for flag in ("stream", "return_tokens", "cache_prompt", "ignore_eos"):
        if flag in body and not isinstance(body[flag], bool):
            raise bad(f"\"{flag}\" must be true or false", flag)
    n_predict = integer(body, "n_predict", -1)
    if n_predict is None:
        n_predict = integer(body, "max_tokens", -1)
    max_tokens = capped_max_tokens(n_predict, max_tokens_limit)
    if max_tokens == 0:
        raise bad("\"n_predict\" must be at least 1 (or -1: as many as fit)", "n_predict")
    stop = body.get("stop", [])
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"\"stop\" must be a list of at most {MAX_STOPS} non-empty strings", "stop")
    # llama-server's defaults (common_params_sampling), not OpenAI's
    fields: dict[str, Any] = {"max_tokens": max_tokens, "stop_sequences": stop, "timeout_ms": None,
                              "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
    for name, low, high in (("temperature", 0.0, 1e9), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0),
                            ("typical_p", 0.0, 1.0), ("frequency_penalty", -2.0, 2.0),
                            ("presence_penalty", -2.0, 2.0), ("repeat_penalty", 0.0, 100.0)):
        value = number(body, name, low, high)
        if value is not None:
            fields[name] = value
    for name, low_int, high_int in (("top_k", 0, None), ("seed", 0, 2**32 - 2), ("repeat_last_n", -1, 2**31 - 1)):
        whole = integer(body, name, low_int, high_int)
        if whole is not None:
            fields[name] = whole
    if body.get("seed") == -1:  # llama-server's "random seed"
        fields.pop("seed", None)
    for flag in ("cache_prompt", "ignore_eos"):
        if flag in body:
            fields[flag] = body[flag]
    bias = _logit_bias(body.get("logit_bias"))
    if bias:
        fields["logit_bias"] = bias
    if "lora" in body:  # llama-server's per-request adapter scales, as on its other generating routes
        fields["lora"] = parse_lora(body["lora"])
    try:
        config = StreamConfig(**fields)
    except InvalidConfigError as exc:
        raise config_error(exc, FIELD_NAMES) from None
    return InfillRequest(prefix, suffix, list(extra), prompt, config, body.get("stream", False),
                         body.get("return_tokens", False), requested_model(body), requested_slot(body))


def _logit_bias(value: Any) -> dict[int, float]:
    """llama-server's ``logit_bias`` by token id: ``[[id, bias], ...]`` or ``{"id": bias}``, a bias of
    ``false`` banning the token."""
    if value is None:
        return {}
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, list):
        raise bad("\"logit_bias\" must be an array of [token id, bias] pairs or an object", "logit_bias")
    bias: dict[int, float] = {}
    for pair in pairs:
        token, amount = pair if isinstance(pair, (list, tuple)) and len(pair) == 2 else (None, None)
        token = int(token) if isinstance(token, str) and token.isdigit() else token
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise bad("\"logit_bias\" takes token ids (strings of text are not supported here)", "logit_bias")
        if amount is False:
            bias[token] = float("-inf")
        elif isinstance(amount, (int, float)) and not isinstance(amount, bool):
            bias[token] = float(amount)
        else:
            raise bad("a \"logit_bias\" value must be a number or false", "logit_bias")
    return bias


def _prepare(served: Served, parsed: InfillRequest) -> tuple[str, EngineRequest]:
    """The infill prompt (budgets from one engine slot, as llama-server's from one slot) as text, and
    its queued sequence (in a worker thread)."""
    engine, model = served.engine, served.model
    if engine is None or model is None:
        raise APIError(400, f"{served.spec.name} is an embedding model: it answers embedding requests only.",
                       code="model_not_generative")
    try:
        fim_tokens(model)
    except InvalidConfigError as exc:
        raise APIError(400, str(exc), type="not_supported_error", code="infill_not_supported") from None
    try:
        tokens = infill_prompt(model, parsed.prefix, parsed.suffix, prompt=parsed.prompt, extra=parsed.extra,
                               n_ctx=engine.n_ctx_per_slot, n_batch=engine.n_batch)
    except (InvalidConfigError, TokenizeError) as exc:  # a token id out of range, text that is not Unicode
        raise APIError(400, str(exc)) from None
    job = _submit(served, tokens, parsed.config, id_slot=parsed.id_slot, field_names=FIELD_NAMES)
    return model.detokenize(tokens, unparse_special=True), job


def _stop_type(job: EngineRequest) -> str:
    if job.finish_reason == "length":
        return "limit"
    if job.finish_reason == "stop":
        return "word" if job.stop_sequence else "eos"
    return "none"


def _final(job: EngineRequest, parsed: InfillRequest, name: str, prompt: str, started: float, *,
           content: str, tokens: list[int]) -> dict:
    """llama-server's final ``/completion`` body for ``job``."""
    predicted, evaluated = job.completion_tokens, job.prompt_tokens
    prompt_s = job.prompt_seconds() or 0.0
    total_s = time.perf_counter() - started
    return {
        "index": 0, "content": content, "tokens": tokens if parsed.return_tokens else [], "id_slot": job.slot_id,
        "stop": True, "model": name, "tokens_predicted": predicted, "tokens_evaluated": evaluated,
        "prompt": prompt, "has_new_line": "\n" in job.text, "truncated": False, "stop_type": _stop_type(job),
        "stopping_word": job.stop_sequence or "", "tokens_cached": evaluated + max(0, predicted - 1),
        "timings": {"cache_n": job.cached_tokens, "prompt_n": evaluated - job.cached_tokens,
                    "prompt_ms": prompt_s * 1000, "predicted_n": predicted,
                    "predicted_ms": max(0.0, total_s - prompt_s) * 1000,
                    **({"draft_n": job.draft_proposed, "draft_n_accepted": job.draft_accepted}
                       if job.draft_proposed else {})},
    }


async def _events(request: Request, job: EngineRequest, parsed: InfillRequest, name: str, prompt: str,
                  started: float) -> AsyncGenerator[str, None]:
    """One event per token, then the final body (its content empty: the tokens carried the text)."""
    try:
        while (token := await job.next_token()) is not None:
            part = {"index": 0, "content": token.text, "tokens": [token.id] if parsed.return_tokens else [],
                    "stop": False, "id_slot": job.slot_id, "tokens_predicted": job.completion_tokens,
                    "tokens_evaluated": job.prompt_tokens}
            yield f"data: {json.dumps(part, ensure_ascii=False)}\n\n"
    except MullamaError as exc:
        yield LLAMA_SERVER.error_event(APIError(500, str(exc), type="server_error"))
        return
    finally:
        job.cancel()
    state(request).finished(request.scope, job.completion_tokens)
    final = _final(job, parsed, name, prompt, started, content="", tokens=[])
    yield f"data: {json.dumps(final, ensure_ascii=False)}\n\n"


@endpoint(LLAMA_SERVER)
async def infill(request: Request) -> Response:
    """``POST /infill``: the middle between ``input_prefix`` and ``input_suffix``."""
    server = state(request)
    started = time.perf_counter()
    parsed = parse_infill(await read_object(request), max_tokens_limit=server.settings.max_tokens_limit)
    lease = await server.pool.lease(parsed.model)
    prompts: list[str] = []

    def start() -> list[EngineRequest]:
        prompt, job = _prepare(lease.served, parsed)
        prompts.append(prompt)
        return [job]

    try:
        (job,) = await submit_in_all(start)
    except BaseException:
        lease.release()
        raise
    name, prompt = parsed.model or lease.name, prompts[0]
    collected: list[int] = []

    async def collect() -> None:
        while (token := await job.next_token()) is not None:
            collected.append(token.id)

    return await stream_or_collect(
        request, LLAMA_SERVER, lease, [job], stream=parsed.stream,
        events=lambda: _events(request, job, parsed, name, prompt, started), collect=collect,
        answer=lambda _: _final(job, parsed, name, prompt, started, content=job.text, tokens=collected))
