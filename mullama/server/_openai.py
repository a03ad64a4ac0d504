"""OpenAI's wire format: ``POST /v1/chat/completions``, ``POST /v1/completions`` (SSE when
``stream``) and ``GET /v1/models`` — request validation and the routes (the response shapes are
in ``_openai_shapes``).

Every problem with a request becomes an ``APIError`` with an HTTP status and the
OpenAI error body, so the server never answers a malformed request with a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .._exceptions import InvalidConfigError, MullamaError
from ..chat._prefill import prefill_text
from ..generate._config import StreamConfig
from ..generate._engine import EngineRequest
from ..generate._sequence import Token
from ._generation import start
from ._http import ServerState, drain, endpoint, merged, read_json, requested_model, state, stream_or_collect
from ._legacy_functions import LEGACY_FIELDS, legacy_finish, legacy_messages, legacy_request
from ._lora import parse_lora
from ._openai_options import predicted_text, with_reasoning_effort
from ._openai_shapes import (
    OPENAI,
    Choice,
    Piece,
    chunk,
    completion_body,
    described_tokens,
    echo_logprobs,
    error_event,
    function_call_delta,
    logprobs_body,
    new_id,
    prediction_usage,
    tool_call_delta,
    usage_chunk,
)
from ._request import (
    APIError,
    ParsedRequest,
    bad,
    boolean,
    capped_max_tokens,
    check_fields,
    config_error,
    integer,
    json_schema_constraint,
    number,
    requested_slot,
)
from ._specs import ModelSpec
from ._tool_calls import ToolCallProgress

__all__ = ["LLAMA_FIELDS", "chat_completions", "completions", "list_models", "parse_request", "retrieve_model"]

# llama-server's extensions to OpenAI's fields (sampling, output constraints, the prompt cache): every
# generating route of OpenAI's format takes them, as llama-server's do.
LLAMA_FIELDS = {"top_k", "min_p", "repeat_penalty", "ignore_eos", "cache_prompt", "reasoning_format", "grammar",
                "json_schema", "typical_p", "repeat_last_n", "mirostat", "mirostat_tau", "mirostat_eta",
                "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n", "xtc_probability",
                "xtc_threshold", "top_n_sigma", "lora", "id_slot"}
# Fields we honour, and fields OpenAI clients send that we accept and ignore.
_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream",
           "stream_options", "n", "frequency_penalty", "presence_penalty", "user", "store", "metadata",
           "service_tier", "logprobs", "top_logprobs", "logit_bias", "response_format", "parallel_tool_calls",
           "tools", "tool_choice"} | LLAMA_FIELDS
# chat_template_kwargs: llama-server's (enable_thinking, ...); modalities: OpenAI's output kinds;
# reasoning_effort reaches the template as llama-server's does; a predicted output is a source of n-gram
# drafts (the answer is the same, sooner). OpenAI's prompt-cache routing, safety and moderation hints and
# GPT-5's verbosity are accepted and ignored.
CHAT_FIELDS = _COMMON | {"messages", "chat_template_kwargs", "modalities", "reasoning_effort", "prompt_cache_key",
                         "prompt_cache_retention", "prompt_cache_options", "safety_identifier", "moderation",
                         "verbosity", "prediction"} | LEGACY_FIELDS
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
MAX_STOPS = 16
MAX_CHOICES = 8
MAX_SEQUENCES = 64  # prompts times choices in one completion request (the engine's default queue)


def parse_request(body: Any, kind: str, *, max_tokens_limit: int) -> ParsedRequest:
    """Check an OpenAI request body and turn it into a StreamConfig and the prompt or messages."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object.")
    allowed = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    check_fields(body, allowed)
    model = requested_model(body)
    n = integer(body, "n", 1, MAX_CHOICES) or 1
    n_logprobs = _requested_logprobs(body, kind)
    legacy = legacy_request(body) if kind == "chat" else None  # the deprecated functions, as tools
    tools = legacy[0] if legacy else body.get("tools") or None
    if tools is not None and kind != "chat":
        raise bad("tools are for /v1/chat/completions.", "tools")
    if tools is not None and not isinstance(tools, list):
        raise bad("'tools' must be a list of function tools.", "tools")
    tool_choice = legacy[1] if legacy else body.get("tool_choice")
    tool_choice = "auto" if tool_choice is None else tool_choice
    if tool_choice not in ("auto", "none", "required") and not isinstance(tool_choice, dict):
        raise bad("'tool_choice' must be 'auto', 'none', 'required' or {\"type\": \"function\", ...}.",
                   "tool_choice")
    if tools is None and tool_choice not in ("auto", "none"):
        raise bad("'tool_choice' needs 'tools'.", "tool_choice")
    parallel = legacy is None and boolean(body, "parallel_tool_calls", True)  # the deprecated form has one call
    if body.get("modalities") not in (None, ["text"]):  # OpenAI's output modalities: text is what a model here writes
        raise bad("'modalities' can only be [\"text\"]: this server answers in text.", "modalities")
    reasoning_format = body.get("reasoning_format", "auto")
    if reasoning_format not in ("auto", "none", "deepseek"):
        raise bad("'reasoning_format' must be 'auto', 'deepseek' (the same) or 'none'.", "reasoning_format")
    if kind == "completion" and body.get("best_of") not in (None, 1):
        raise bad("best_of is not supported by this server: ask for n choices and choose among them.", "best_of")
    echo = kind == "completion" and boolean(body, "echo", False)
    suffix = body.get("suffix") or None  # insertion: the middle between the prompt and the suffix
    if suffix is not None and (not isinstance(suffix, str) or echo):
        raise bad("'suffix' must be a string, the text after the insertion (and without 'echo').", "suffix")

    stream = boolean(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        extra = sorted(set(options) - {"include_usage", "include_obfuscation", "continuous_usage_stats"}) \
            if isinstance(options, dict) else None
        if extra is None:
            raise bad("'stream_options' must be an object like {\"include_usage\": true}.", "stream_options")
        if extra:
            raise bad(f"'stream_options' has no field {extra[0]!r}; it takes include_usage and include_obfuscation.",
                      "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise bad("'stream_options.include_usage' must be true or false.", "stream_options")

    max_tokens = integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", 1)
    max_tokens = capped_max_tokens(max_tokens, max_tokens_limit)

    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop] if stop else []
    elif isinstance(stop, list) and len(stop) <= MAX_STOPS and all(isinstance(s, str) and s for s in stop):
        stops = list(stop)
    else:
        raise bad(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings.", "stop")

    fields: dict[str, Any] = {"max_tokens": max_tokens, "stop_sequences": stops, "timeout_ms": None,
                              "top_p": 1.0, "top_k": 40}
    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("min_p", 0.0, 1.0),
                            ("frequency_penalty", -2.0, 2.0), ("presence_penalty", -2.0, 2.0),
                            ("repeat_penalty", 0.0, 100.0)):
        value = number(body, name, low, high)
        if value is not None:
            fields[name] = value
    for name, low_int, high_int in (("top_k", 0, None), ("seed", 0, 2**32 - 2)):
        whole = integer(body, name, low_int, high_int)
        if whole is not None:
            fields[name] = whole
    prediction = predicted_text(body.get("prediction"))
    if prediction is not None:
        fields["prediction"] = prediction
    for flag in ("ignore_eos", "cache_prompt"):  # llama-server's extensions
        if isinstance(body.get(flag), bool):
            fields[flag] = body[flag]
    for name in ("typical_p", "mirostat_tau", "mirostat_eta", "dry_multiplier", "dry_base", "xtc_probability",
                 "xtc_threshold", "top_n_sigma"):
        value = number(body, name, -1e9, 1e9)
        if value is not None:
            fields[name] = value
    for name in ("repeat_last_n", "mirostat", "dry_allowed_length", "dry_penalty_last_n"):
        whole = integer(body, name, -1, 2**31 - 1)
        if whole is not None:
            fields[name] = whole
    fields.update(_output_constraint(body))
    if "lora" in body:  # llama-server's per-request adapter scales (mullama.server._lora)
        fields["lora"] = parse_lora(body["lora"])
    if n_logprobs is not None:
        fields["logprobs"] = n_logprobs
        if echo:  # the prompt's tokens are scored too (evals' loglikelihoods)
            fields["prompt_logprobs"] = n_logprobs
    bias = _logit_bias(body.get("logit_bias"))
    if bias:
        fields["logit_bias"] = bias
    names = _field_names(kind)
    try:
        config = StreamConfig(**fields)
    except InvalidConfigError as exc:
        raise config_error(exc, names) from None

    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad("'messages' must be a non-empty list of {role, content} objects.", "messages")
        kwargs = body.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise bad("'chat_template_kwargs' must be an object of the template's variables.", "chat_template_kwargs")
        kwargs = with_reasoning_effort(kwargs, body.get("reasoning_effort"))
        return ParsedRequest("chat", config, stream, include_usage, messages=legacy_messages(messages), n=n,
                             tools=tools, chat_template_kwargs=kwargs, legacy_functions=legacy is not None,
                             tool_choice=tool_choice, parallel_tool_calls=parallel,
                             reasoning_format="none" if reasoning_format == "none" else "auto", model=model,
                             id_slot=requested_slot(body), field_names=names)
    return ParsedRequest("completion", config, stream, include_usage, prompts=_prompts(body.get("prompt"), n),
                         n=n, model=model, id_slot=requested_slot(body), field_names=names, echo=echo, suffix=suffix)


def _prompts(value: Any, n: int) -> list[str | list[int]]:
    """OpenAI's ``prompt``: a string, a list of token ids, or a list of several of either; each prompt is
    answered with ``n`` choices (choice ``i * n + j`` is prompt i's j-th)."""
    if _is_prompt(value):
        return [value]
    if not isinstance(value, list) or not value or not all(_is_prompt(each) for each in value):
        raise bad("'prompt' must be a non-empty string, a list of token ids, or a list of such prompts.", "prompt")
    if len(value) * n > MAX_SEQUENCES:
        raise bad(f"{len(value)} prompts with n={n} make {len(value) * n} sequences; one request may start at "
                  f"most {MAX_SEQUENCES}: send the prompts in several requests.", "prompt")
    return value


def _is_prompt(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, list) and bool(value) and \
        all(isinstance(token, int) and not isinstance(token, bool) for token in value)


def _field_names(kind: str) -> dict[str, str]:
    """The request's field for each StreamConfig field whose name differs (see config_error)."""
    return {"stop_sequences": "stop", "logprobs": "top_logprobs" if kind == "chat" else "logprobs"}


def _requested_logprobs(body: dict, kind: str) -> int | None:
    """How many alternatives per token the request wants (None: no logprobs). Chat: ``logprobs: true``
    with ``top_logprobs`` 0-20; completions: ``logprobs`` 0-20 (OpenAI's legacy field)."""
    if kind == "chat":
        wanted = body.get("logprobs")
        if wanted not in (None, True, False):
            raise bad("'logprobs' must be true or false.", "logprobs")
        top = integer(body, "top_logprobs", 0, 20)
        if top is not None and not wanted:
            raise bad("'top_logprobs' needs 'logprobs': true.", "top_logprobs")
        return (top or 0) if wanted else None
    if body.get("top_logprobs") is not None:
        raise bad("completions take 'logprobs': N; 'top_logprobs' is for chat.", "top_logprobs")
    return integer(body, "logprobs", 0, 20)


def _output_constraint(body: dict) -> dict[str, Any]:
    """``response_format`` (OpenAI), or llama-server's ``grammar`` / ``json_schema``, as StreamConfig fields."""
    response_format = body.get("response_format")
    grammar, schema = body.get("grammar"), body.get("json_schema")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in ("text", "json_object",
                                                                                          "json_schema"):
            raise bad("'response_format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                       "{\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": {...}}}.",
                       "response_format")
        kind = response_format["type"]
        if kind == "json_object":
            schema = {"type": "object"}
        elif kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                raise bad("'response_format.json_schema' must be an object with a 'schema'.", "response_format")
            schema = spec.get("schema", {})
    if grammar is not None and schema is not None:
        raise bad("send one of 'grammar', 'json_schema' and a JSON 'response_format', not several.", "grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise bad("'grammar' must be GBNF text with a root rule.", "grammar")
        return {"grammar": grammar}
    if schema is not None:
        return json_schema_constraint(schema, "json_schema")
    return {}


def _logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's logit_bias: token ids as strings (or ints) -> a bias from -100 to 100."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > 1024:
        raise bad("'logit_bias' must be an object of at most 1024 token ids -> biases.", "logit_bias")
    result: dict[int, float] = {}
    for key, bias in value.items():
        token = key if isinstance(key, int) else int(key) if isinstance(key, str) and key.isdigit() else None
        if token is None or isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                or not math.isfinite(bias) or not -100 <= bias <= 100:
            raise bad(f"'logit_bias' maps token ids to numbers from -100 to 100; {key!r}: {bias!r} is not that.",
                       "logit_bias")
        result[token] = float(bias)
    return result



# --- routes ------------------------------------------------------------------------------------
@endpoint(OPENAI)
async def chat_completions(request: Request) -> Response:
    return await _generate(request, "chat")


@endpoint(OPENAI)
async def completions(request: Request) -> Response:
    return await _generate(request, "completion")


@endpoint(OPENAI)
async def list_models(request: Request) -> Response:
    """Every model this server answers for, and whether it is loaded now."""
    server = state(request)
    return JSONResponse({"object": "list", "data": [_model_object(server, spec) for spec in server.pool.specs]})


@endpoint(OPENAI)
async def retrieve_model(request: Request) -> Response:
    """``GET /v1/models/{model}`` (the openai client's ``models.retrieve``): the model's entry of the
    list, for its name or one of its aliases; any other name is OpenAI's 404 ``model_not_found`` (even on
    a one-model server, whose generating routes take any name)."""
    server = state(request)
    name = request.path_params["model"]
    spec = server.pool.named_exactly(name)
    if spec is None:
        raise APIError(404, f"The model '{name[:200]}' does not exist; GET /v1/models lists the models served "
                            "here.", param="model", code="model_not_found")
    return JSONResponse(_model_object(server, spec))


def _model_object(server: ServerState, spec: ModelSpec) -> dict:
    """A served model as OpenAI's model object, with its aliases and whether it is loaded now."""
    served = server.pool.served(spec)
    status = "unloaded" if served is None else "loaded" if served.loaded else \
        "unloading" if served.draining else "loading"
    return {"id": spec.name, "object": "model", "created": server.created, "owned_by": "mullama",
            "aliases": list(spec.aliases), "loaded": status == "loaded", "status": {"value": status}}


async def _generate(request: Request, kind: str) -> Response:
    server = state(request)
    body = await read_json(request)
    parsed = parse_request(body, kind, max_tokens_limit=server.settings.max_tokens_limit)
    lease, jobs = await start(request, parsed)
    request_id, name = new_id(kind), lease.name
    first_choices = jobs[::parsed.n]  # one per prompt: its prompt tokens count once in the usage
    n_prompt = sum(job.prompt_tokens for job in first_choices)

    def n_cached() -> int:  # known once the engine admitted the sequences: read when the usage is written
        return sum(job.cached_tokens for job in first_choices)
    assert lease.served.model is not None
    piece = lease.served.model._cached_piece
    # A trailing assistant message is continued; as llama-server, the answer's content starts with it. With
    # echo, a completion's text starts with its prompt.
    before = [prefill_text(parsed.messages) if kind == "chat" else
              _echoed(parsed.prompts[i // parsed.n], piece) if parsed.echo else "" for i in range(len(jobs))]

    def answer(generated: list[list[Token]]) -> dict:  # n choices with logprobs can be megabytes
        choices = [_choice(job, tokens, kind, piece, text, parsed)
                   for job, tokens, text in zip(jobs, generated, before)]
        return completion_body(kind, request_id, name, choices, n_prompt, sum(job.completion_tokens for job in jobs),
                               n_cached(), prediction_usage(parsed.config, jobs))

    return await stream_or_collect(
        request, OPENAI, lease, jobs, stream=parsed.stream,
        events=lambda: _events(jobs, parsed, kind, request_id, (n_prompt, n_cached), name, piece, request, before),
        collect=lambda: asyncio.gather(*(drain(job) for job in jobs)), answer=answer)


def _echoed(prompt: str | list[int], piece: Piece) -> str:
    """The text ``echo`` puts before a completion's: its prompt as sent, or the text of its token ids."""
    return prompt if isinstance(prompt, str) else b"".join(piece(token) for token in prompt).decode("utf-8", "replace")


def _choice(job: EngineRequest, tokens: list[Token], kind: str, piece: Piece, before: str,
            parsed: ParsedRequest) -> Choice:
    """A whole choice: ``before`` (a prefill, or with ``echo`` the prompt) and the generated text, its
    logprobs (with echo, the prompt's tokens' first), tool calls (or the deprecated function call) and
    thought."""
    calls = [call.to_openai() for call in job.tool_calls] or None
    finish = job.finish_reason or "stop"
    logprobs: dict | None
    if parsed.echo and job.config.prompt_logprobs is not None:
        generated = tokens if job.stop_sequence is None else described_tokens(tokens)
        logprobs = echo_logprobs(job._sequence.scored_prompt + generated, piece)
    else:
        logprobs = logprobs_body(kind, described_tokens(tokens), piece)
    if parsed.legacy_functions:
        return Choice(before + job.text, legacy_finish(finish), logprobs, reasoning=job.reasoning or None,
                      function_call=calls[0]["function"] if calls else None)
    return Choice(before + job.text, finish, logprobs, calls, job.reasoning or None)


async def _events(jobs: list[EngineRequest], parsed: ParsedRequest, kind: str, request_id: str,
                  prompt_usage: tuple[int, Callable[[], int]],
                  model_name: str, piece: Piece, request: Request, before: list[str]) -> AsyncGenerator[str, None]:
    """The SSE body of a streamed answer: the role, then text, thought and tool-call deltas per choice as
    they come, each choice's finish_reason, usage when asked for, and ``[DONE]``. With usage asked for,
    every chunk before the usage chunk says ``"usage": null``, as OpenAI's spec has it. ``before``: each
    choice's text before the generated one (a chat's prefill, sent after the role; an echoed prompt, sent
    with its logprobs when the choice's first token comes)."""
    stamp = int(time.time())

    def event(payload: dict) -> str:
        if parsed.include_usage:
            payload.setdefault("usage", None)
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        if kind == "chat":
            for index in range(len(jobs)):
                calls = jobs[index].config.tool_calls  # a forced call has no content: null, as llama-server's
                yield event(chunk(kind, request_id, model_name, stamp, role=True, index=index,
                                  text=None if calls is not None and calls.forced else ""))
                if before[index]:  # the continued assistant message first, as llama-server's first delta has it
                    yield event(chunk(kind, request_id, model_name, stamp, text=before[index], index=index))
        pending: list[list[Token]] = [[] for _ in jobs]  # tokens whose text is not out yet, per choice
        described = [len(text) for text in before]  # characters of each choice described so far (text_offset)
        calls = [ToolCallProgress() for _ in jobs]
        echoing = [parsed.echo] * len(jobs)
        async for index, token in merged(jobs):
            if isinstance(token, MullamaError):
                yield error_event(APIError(500, str(token), type="server_error", code=token.code.lower()))
                return
            if echoing[index]:  # the prompt is scored once decoded: before this choice's first token
                echoing[index] = False
                scored = jobs[index]._sequence.scored_prompt
                yield event(chunk(kind, request_id, model_name, stamp, text=before[index], index=index,
                                  logprobs=echo_logprobs(scored, piece) if scored else None))
            if token is None:
                finish = jobs[index].finish_reason
                yield event(chunk(kind, request_id, model_name, stamp, index=index, finish_reason=legacy_finish(
                    finish) if parsed.legacy_functions and finish else finish))
                continue
            parser = jobs[index]._sequence.tools
            if parser is not None:
                for call in calls[index].after(parser):
                    if not parsed.legacy_functions:
                        yield event(chunk(kind, request_id, model_name, stamp, index=index,
                                          tool_call=tool_call_delta(call)))
                    elif call.index == 0:  # the deprecated form has one call
                        yield event(chunk(kind, request_id, model_name, stamp, index=index,
                                          function_call=function_call_delta(call)))
            if token.kind == "reasoning":
                yield event(chunk(kind, request_id, model_name, stamp, index=index, reasoning=token.text))
                continue
            pending[index].append(token)
            if token.text:
                logprobs = logprobs_body(kind, pending[index], piece, described[index])
                if logprobs is not None and kind != "chat":  # the next piece's tokens start after these
                    described[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                yield event(chunk(kind, request_id, model_name, stamp, text=token.text, logprobs=logprobs,
                                  index=index))
                pending[index] = []
        completion_tokens = sum(job.completion_tokens for job in jobs)
        if parsed.include_usage:
            yield event(usage_chunk(kind, request_id, model_name, stamp, prompt_usage[0], completion_tokens,
                                    prompt_usage[1](), prediction_usage(parsed.config, jobs)))
        yield "data: [DONE]\n\n"
        state(request).finished(request.scope, completion_tokens)
    finally:  # the client went away, or we are done: either way the sequences stop now
        for job in jobs:
            job.cancel()
