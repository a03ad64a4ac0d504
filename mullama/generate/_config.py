"""StreamConfig: what to generate and how (the seed's fields and defaults, plus a few more)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, cast

from .._exceptions import InvalidConfigError
from ..structured._schema import schema_of

__all__ = ["StreamConfig", "named_for_the_caller", "resolve_config"]

MAX_SEED = 2**32 - 2  # 2**32 - 1 is llama.cpp's "random seed"
INT32_MAX = 2**31 - 1  # llama.cpp takes counts as int32_t
MAX_BUFFER = 1_000_000  # tokens a stream's buffer may hold
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000  # a week
MAX_STOP_CHARS = 1000  # per stop sequence
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
MAX_DRAFT = 1024  # tokens a speculative draft may have (upstream's limit for its n-gram sizes)
SPECULATIVE = (None, "ngram", "ngram-simple", "draft")  # StreamConfig.speculative's values


def _fail(name: str, value: Any, expected: str) -> None:
    raise InvalidConfigError(f"StreamConfig.{name} must be {expected}, not {value!r}.", field=name)


def named_for_the_caller(error: InvalidConfigError, names: Mapping[str, str]) -> tuple[str, str | None]:
    """``error``'s message with the StreamConfig field at fault called what the caller calls it (``names``:
    field -> a request's field such as ``options.temperature``, or a command's flag such as ``--temp``),
    and that name (None when the error names no field)."""
    if error.field is None:
        return str(error), None
    name = names.get(error.field, error.field)
    return str(error).replace(f"StreamConfig.{error.field}", name), name


def _check_int(name: str, value: Any, low: int, high: int | None = None, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        _fail(name, value, f"an integer {bound}" + (" (or None)" if optional else ""))


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        _fail(name, value, f"a number in {'(' if low_open else '['}{low}, {high}]")


@dataclass
class StreamConfig:
    """How to generate: sampling, limits, stop sequences, buffering and timeout.

    ``temperature=0`` is greedy decoding (what upstream llama.cpp gives at temperature 0).
    A ``seed`` makes sampling reproducible. Invalid values raise InvalidConfigError
    (``code == "INVALID_CONFIG"``) naming the field.

    The samplers and their defaults beyond the seed's five are upstream's (``common_sampler``),
    applied in its order: logit bias, grammar, penalties, DRY, top-n-sigma, top-k, typical-p,
    top-p, min-p, XTC, temperature, then the pick (or mirostat). ``grammar`` (GBNF) or
    ``json_schema`` constrain the output.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 40
    top_p: float = 0.9
    stop_sequences: Sequence[str] = field(default_factory=list)
    buffer_size: int = 64
    timeout_ms: int | None = 30000
    seed: int | None = None
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit (-inf bans it)
    logprobs: int | None = None  # K: every token gets its logprob and the K most likely alternatives
    # K: every prompt token after the first gets its logprob given those before it, and the K most likely
    # there (scoring, as evals ask with OpenAI's echo); the prompt is then decoded whole, not taken from the cache
    prompt_logprobs: int | None = None
    grammar: str | None = None  # GBNF, with a `root` rule
    json_schema: Any = None  # a JSON Schema (dict, or True for any JSON value) the output must follow
    tool_calls: Any = None  # set by chat_stream(tools=...): how calls are constrained and parsed (_tools.ToolCalling)
    # Set by chat_stream(json_schema=...): the JSON may sit in a ```json fence, which the text leaves out
    # (upstream's chat route; see mullama.structured._response_format).
    fenced_json: bool = False
    reasoning: Any = None  # set by chat_stream for thinking templates: where the thought is (_reasoning.Reasoning)
    ignore_eos: bool = False  # ban end-of-generation tokens, as llama-server does: run to max_tokens (benchmarks)
    # Reuse the KV cache of the prompt's beginning when it is already there (llama-server's
    # cache_prompt). False decodes the whole prompt afresh: batch boundaries then fall where a fresh
    # run puts them, which some models' kernels need for bit-identical output.
    cache_prompt: bool = True
    # LoRA adapters for this generation ({path | adapter | id: scale}, or a list of paths or pairs; the
    # ones not named at 0, as llama-server's per-request "lora"); None: the Context's or the model's.
    lora: Any = None
    # Speculative decoding (docs/speculative.md): "ngram" drafts from the context itself (upstream's
    # ngram-simple: the last draft_min tokens looked up earlier in the prompt and output, the tokens that
    # followed them proposed, up to draft_max of them, each draft cut to the length that pays at the
    # acceptance seen so far) and verifies each draft in one decode, pausing after rejected drafts;
    # "ngram-simple" is upstream's exactly (draft_min to draft_max tokens at every match).
    # "draft": a Context's draft model proposes draft_max tokens. The tokens are the ones decoding one at a
    # time gives; only the speed changes. None: off.
    speculative: str | None = None
    draft_max: int = 16
    draft_min: int = 4
    # Text the answer is expected to repeat much of (OpenAI's predicted output: the file being edited).
    # N-gram drafts are looked up in it as well as in the context, and without ``speculative`` it turns
    # "ngram" on (a draft model, speculative="draft", drafts without it); the answer is the same with it
    # or without.
    prediction: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop_sequences, str):
            self.stop_sequences = [self.stop_sequences]
        self.json_schema = schema_of(self.json_schema)  # a pydantic model class: its JSON Schema
        self.validate()

    def validate(self) -> None:
        """Check every field; raise InvalidConfigError naming the first bad one."""
        _check_int("max_tokens", self.max_tokens, 1, INT32_MAX)
        _check_float("temperature", self.temperature, 0.0, 100.0)
        _check_int("top_k", self.top_k, 0, INT32_MAX)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if not isinstance(self.stop_sequences, (list, tuple)):
            _fail("stop_sequences", self.stop_sequences, "a list of non-empty strings")
        for stop in self.stop_sequences:
            if not isinstance(stop, str) or not stop or len(stop) > MAX_STOP_CHARS:
                _fail("stop_sequences", self.stop_sequences,
                      f"a list of non-empty strings of at most {MAX_STOP_CHARS} characters")
        self.stop_sequences = list(self.stop_sequences)
        _check_int("buffer_size", self.buffer_size, 1, MAX_BUFFER)
        _check_int("timeout_ms", self.timeout_ms, 1, MAX_TIMEOUT_MS, optional=True)
        _check_int("seed", self.seed, 0, MAX_SEED, optional=True)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repeat_penalty", self.repeat_penalty, 0.0, 100.0, low_open=True)
        _check_int("repeat_last_n", self.repeat_last_n, -1, INT32_MAX)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        if not isinstance(self.ignore_eos, bool):
            _fail("ignore_eos", self.ignore_eos, "True or False")
        if not isinstance(self.cache_prompt, bool):
            _fail("cache_prompt", self.cache_prompt, "True or False")
        _check_float("typical_p", self.typical_p, 0.0, 1.0)
        _check_float("top_n_sigma", self.top_n_sigma, -1.0, 100.0)
        _check_float("xtc_probability", self.xtc_probability, 0.0, 1.0)
        _check_float("xtc_threshold", self.xtc_threshold, 0.0, 1.0)
        _check_float("dry_multiplier", self.dry_multiplier, 0.0, 100.0)
        _check_float("dry_base", self.dry_base, 0.0, 100.0)
        _check_int("dry_allowed_length", self.dry_allowed_length, 0, INT32_MAX)
        _check_int("dry_penalty_last_n", self.dry_penalty_last_n, -1, INT32_MAX)
        _check_int("mirostat", self.mirostat, 0, 2)
        _check_float("mirostat_tau", self.mirostat_tau, 0.0, 100.0)
        _check_float("mirostat_eta", self.mirostat_eta, 0.0, 1.0)
        self._check_logit_bias()
        if self.speculative not in SPECULATIVE:
            _fail("speculative", self.speculative, " or ".join(repr(kind) for kind in SPECULATIVE))
        _check_int("draft_max", self.draft_max, 1, MAX_DRAFT)
        _check_int("draft_min", self.draft_min, 1, self.draft_max)
        if self.prediction is not None and not isinstance(self.prediction, str):
            _fail("prediction", self.prediction, "a str (the text the answer is expected to repeat) or None")
        _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS, optional=True)
        _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS, optional=True)
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            _fail("grammar", self.grammar, "GBNF text (a str with a root rule) or None")
        if self.json_schema is not None:
            if self.grammar is not None:
                raise InvalidConfigError("StreamConfig takes grammar or json_schema, not both.")
            if not isinstance(self.json_schema, (dict, bool)):
                _fail("json_schema", self.json_schema, "a JSON Schema (a dict, or True), a pydantic model or None")
        if self.tool_calls is not None:
            from ..chat._tools import ToolCalling

            if not isinstance(self.tool_calls, ToolCalling):
                _fail("tool_calls", self.tool_calls, "None (it is set by chat_stream(tools=...))")
        if self.reasoning is not None:
            from ..chat._reasoning import Reasoning

            if not isinstance(self.reasoning, Reasoning):
                _fail("reasoning", self.reasoning, "None (it is set by chat_stream)")

    def _check_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, Mapping) or len(bias) > 1_000_000:
            _fail("logit_bias", bias, "a dict of token id -> bias")
        for token, value in bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= INT32_MAX:
                _fail("logit_bias", bias, "a dict whose keys are token ids (non-negative integers)")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
                    or value == math.inf or (math.isfinite(value) and abs(value) > 100):
                _fail("logit_bias", bias, "a dict of biases from -100 to 100 (or -inf to ban a token)")

    def grammar_text(self) -> str | None:
        """The GBNF grammar that constrains the output: ``grammar``; ``json_schema`` converted (in a chat
        answer's form when ``fenced_json``); the tool calls' grammar; or, with tools and a ``json_schema``
        both, either calls or that JSON (a forced call: calls only)."""
        calls = self.tool_calls
        if self.grammar is not None:
            return self.grammar
        if calls is not None and (self.json_schema is None or calls.forced):
            return cast("str | None", calls.grammar)
        if self.json_schema is None:
            return None
        if calls is not None:
            return cast("str | None", calls.or_json(self.json_schema))
        if self.fenced_json:
            from ..structured._response_format import chat_json_grammar

            return chat_json_grammar(self.json_schema)
        from ..structured._json_schema import json_schema_to_grammar

        return json_schema_to_grammar(self.json_schema)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def drafts_ngrams(self) -> bool:
        """Whether tokens are drafted by n-gram lookup: ``speculative`` "ngram" or "ngram-simple", or a
        ``prediction`` given without ``speculative``."""
        if self.speculative is None:
            return bool(self.prediction)
        return self.speculative in ("ngram", "ngram-simple")

    def with_options(self, **changes: Any) -> StreamConfig:
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise InvalidConfigError(f"StreamConfig has no field {min(unknown)!r}.")
        return replace(self, **changes)


def resolve_config(config: StreamConfig | int | None, max_tokens: int | None, options: dict[str, Any]) -> StreamConfig:
    """The config for ``generate_stream(prompt, config, max_tokens=..., **options)``.

    ``config`` may be a StreamConfig, None (the defaults), or an int (``generate_stream(prompt, 500)``);
    ``max_tokens`` and keyword options override its fields.
    """
    if isinstance(config, int) and not isinstance(config, bool):
        config, max_tokens = None, config
    if config is None:
        config = StreamConfig()
    elif not isinstance(config, StreamConfig):
        raise InvalidConfigError(f"config must be a StreamConfig, not {type(config).__name__}.")
    if max_tokens is not None:
        options = dict(options, max_tokens=max_tokens)
    return config.with_options(**options) if options else config
