"""From the internal request to running sequences: render and tokenise the prompt of a served
model, then queue one sequence per choice on its engine. Every wire format generates through here."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from starlette.requests import Request

from .._exceptions import (
    ContextOverflowError,
    EngineError,
    InvalidConfigError,
    MediaError,
    QueueFullError,
    TemplateError,
    TokenizeError,
)
from ..chat._reasoning import thinks
from ..generate._chat_turn import chat_media, chat_prompt, chat_turn, turn_tokens
from ..generate._config import StreamConfig
from ..generate._engine import EngineRequest
from ..generate._infill import fim_tokens, infill_prompt
from ..generate._media import MediaPrompt
from ._http import ServerSettings, state, submit_in_all
from ._keep_alive import UNSET
from ._pool import Lease, Served
from ._request import APIError, ParsedRequest, config_error
from ._truncation import answer_room, truncated
from ._workers import ADMIN

__all__ = ["count_prompt_tokens", "prepare", "prompt_tokens", "rendered_prompt", "start"]


def prompt_tokens(served: Served, parsed: ParsedRequest, settings: ServerSettings,
                  which: int = 0) -> tuple[list[int], StreamConfig, MediaPrompt | None]:
    """The request's prompt (of a completion with several, the one at index ``which``), rendered (with its
    tools) and tokenised, the config to generate it with, and its images and audio when it has any (CPU
    work: called in a worker thread). A prompt of token ids is taken as it is, as llama-server takes it. A
    chat that ``truncate``s and does not fit its context loses its oldest messages (see _truncation)."""
    model = served.model
    assert model is not None  # the caller holds a lease
    prompt, config = rendered_prompt(served, parsed, settings, which)
    with _refusals(parsed):
        if isinstance(prompt, list):
            return model._check_tokens(prompt), config, None
        tokens, media = turn_tokens(model, prompt)
    engine = served.engine
    if parsed.truncate and parsed.messages and engine is not None and len(tokens) >= engine.n_ctx_per_slot:
        n_ctx = engine.n_ctx_per_slot  # the engine refuses this prompt: shorten the chat
        whole = dataclasses.replace(parsed, truncate=False)

        def measure(kept: list[dict]) -> tuple[list[int], StreamConfig, MediaPrompt | None]:
            return prompt_tokens(served, dataclasses.replace(whole, messages=kept), settings)

        return truncated(parsed.messages, measure, lambda made: len(made[0]) + answer_room(made[1], n_ctx) <= n_ctx)
    return tokens, config, media


def rendered_prompt(served: Served, parsed: ParsedRequest, settings: ServerSettings, which: int = 0, *,
                    media: bool = True) -> tuple[str | MediaPrompt | list[int], StreamConfig]:
    """The request's prompt before tokenising: a chat's messages through the template (with ``media``,
    tokenised with their images and audio when they hold any; without, the text with the projector's
    markers, as llama-server's /apply-template shows it), or the completion prompt ``which``."""
    model = served.model
    assert model is not None  # the caller holds a lease
    param = "messages" if parsed.kind == "chat" else "prompt"
    if parsed.think and not thinks(model.chat_template):  # ollama's words for it
        raise APIError(400, f"{json.dumps(parsed.model or served.spec.name)} does not support thinking",
                       param="think")
    prompt: str | MediaPrompt | list[int]
    if parsed.messages is None:
        prompt, config = parsed.prompts[which], parsed.config
        if parsed.suffix is not None:
            prompt = _fill_in_the_middle(served, parsed, prompt)
    elif model.chat_template is None:
        raise APIError(400, f"{served.spec.name} has no chat template (a base model): send a prompt to a "
                            "completion route, or start the server with --chat-template-file.", param=param,
                       code="no_chat_template")
    else:
        options = {"tools": parsed.tools, "tool_choice": parsed.tool_choice,
                   "parallel_tool_calls": parsed.parallel_tool_calls, "chat_template": None,
                   "chat_template_kwargs": parsed.chat_template_kwargs, "reasoning_format": parsed.reasoning_format}
        with _refusals(parsed):
            if media:
                prompt, config = chat_turn(model, parsed.messages, parsed.config, limits=settings.media, **options)
            else:
                prompt, config = chat_prompt(model, chat_media(model, parsed.messages)[0], parsed.config, **options)
    if isinstance(prompt, str) and len(prompt) > settings.max_prompt_chars:
        raise APIError(413, f"the prompt is {len(prompt)} characters long once rendered; the limit is "
                            f"{settings.max_prompt_chars}.", param=param)
    return prompt, config


def _fill_in_the_middle(served: Served, parsed: ParsedRequest, prefix: str | list[int]) -> list[int]:
    """A request's ``suffix`` (ollama's /api/generate, OpenAI's /v1/completions): the infill prompt of the
    prompt and the suffix, as ``/infill`` builds it from one engine slot's budgets; a model without FIM
    tokens is a 400 in ollama's words."""
    model, engine = served.model, served.engine
    assert model is not None and engine is not None  # the caller holds a lease on a generating model
    try:
        fim_tokens(model)
    except InvalidConfigError:
        raise APIError(400, f"{json.dumps(parsed.model or served.spec.name)} does not support insert",
                       param="suffix") from None
    with _refusals(parsed):
        return infill_prompt(model, prefix, parsed.suffix, n_ctx=engine.n_ctx_per_slot, n_batch=engine.n_batch)


# The library's words name Model.load; a server's user starts the server instead.
SERVED_TEXT_ONLY = ("this model takes text only: send text, or serve it with its projector (mullama serve MODEL "
                    "--mmproj FILE.gguf; a hub model with one finds it itself) to send images or audio.")


@contextmanager
def _refusals(parsed: ParsedRequest) -> Iterator[None]:
    """The library's refusals of a request's prompt as the client's errors (400, or 413 for media too large)."""
    param = "messages" if parsed.kind == "chat" else "prompt"
    try:
        yield
    except MediaError as exc:  # an image or clip that cannot be used: the client's to fix
        message = SERVED_TEXT_ONLY if str(exc).startswith("this model takes text only") else str(exc)
        raise APIError(413 if exc.code == "MEDIA_TOO_LARGE" else 400, message, param=param, code=exc.code) from None
    except (TemplateError, TokenizeError, InvalidConfigError) as exc:
        if isinstance(exc, InvalidConfigError) and exc.field is not None:  # a setting the request gave
            raise config_error(exc, parsed.field_names) from None
        tools_problem = parsed.tools and ("tool" in str(exc) or "grammar" in str(exc))
        raise APIError(400, str(exc), param="tools" if tools_problem else param) from None


async def count_prompt_tokens(request: Request, parsed: ParsedRequest) -> int:
    """How many tokens ``parsed``'s prompt has once rendered (a token-count route: nothing generated)."""
    server = state(request)
    async with await server.pool.lease(parsed.model) as served:
        tokens, _config, _media = await ADMIN.run(prompt_tokens, served, parsed, server.settings)
    return len(tokens)


async def start(request: Request, parsed: ParsedRequest, *, keep_alive: float | None = UNSET
                ) -> tuple[Lease, list[EngineRequest]]:
    """Lease the model the request names (loading it if need be) and queue its sequences. The caller
    releases the lease when its answer is complete (a streamed one: ``lease.until_closed``)."""
    server = state(request)
    lease = await server.pool.lease(parsed.model, keep_alive=keep_alive)
    try:
        jobs = await submit_in_all(lambda: prepare(lease.served, parsed, server.settings))
    except BaseException:
        lease.release()
        raise
    return lease, jobs


def prepare(served: Served, parsed: ParsedRequest, settings: ServerSettings) -> list[EngineRequest]:
    """Render and tokenise ``parsed``, then queue one sequence per choice (in a worker thread: the
    event loop stays free). If one cannot be queued, none is."""
    if served.engine is None:
        raise APIError(400, f"{served.spec.name} is an embedding model: it answers embedding requests only.",
                       code="model_not_generative")
    jobs: list[EngineRequest] = []
    try:
        for which in range(max(1, len(parsed.prompts))):  # a chat has its messages, no prompts
            tokens, config, media = prompt_tokens(served, parsed, settings, which)
            if parsed.context and media is None:
                with _refusals(parsed):
                    tokens = continued(served, parsed.context, tokens)
            for choice_config in parsed.choice_configs(config):
                jobs.append(_submit(served, tokens, choice_config, media, parsed.id_slot, parsed.field_names))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    return jobs


def continued(served: Served, context: list[int], tokens: list[int]) -> list[int]:
    """A prompt after ollama's ``context`` (the tokens of an earlier prompt and its answer): that
    conversation, then this prompt without the BOS the model starts a text with."""
    model = served.model
    assert model is not None  # the caller holds a lease
    if tokens and model.add_bos and tokens[0] == model.bos_token_id:
        tokens = tokens[1:]
    return [*model._check_tokens(context), *tokens]


def _submit(served: Served, tokens: list[int], config: StreamConfig, media: MediaPrompt | None = None,
            id_slot: int | None = None, field_names: Mapping[str, str] | None = None) -> EngineRequest:
    """Queue one sequence; a refusal is an APIError (a setting the engine refuses names the request's
    field, ``field_names``: see config_error)."""
    assert served.engine is not None
    try:
        return served.engine.submit(tokens, config, media, slot=id_slot)
    except QueueFullError as exc:
        raise APIError(429, str(exc), type="rate_limit_error", code="queue_full") from None
    except ContextOverflowError as exc:
        raise APIError(400, str(exc), code="context_length_exceeded") from None
    except EngineError as exc:
        raise APIError(503, str(exc), type="server_error", code="engine_failed") from None
    except InvalidConfigError as exc:
        raise config_error(exc, field_names) from None
