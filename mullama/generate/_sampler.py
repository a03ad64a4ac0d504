"""llama.cpp's own sampler chain, configured from Python (no sampling in Python).

The chain is built in the order of upstream's ``common_sampler`` (what llama-server and
llama-cli use): the model's suppressed tokens as a logit bias, then penalties, top-k,
top-p, min-p, temperature and the final pick. At ``temperature=0`` the pick is greedy,
after the penalties, exactly as upstream's chain picks the most likely token at
temperature 0 (its temperature sampler keeps only the maximum).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .._exceptions import InvalidConfigError, StreamingError
from ..native import _library
from ..native._owned import Owned
from ..structured._gbnf_check import check_grammar

if TYPE_CHECKING:
    from ._config import StreamConfig
    from ._model import Model

__all__ = ["SamplerChain"]

RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed
DRY_BREAKERS = ("\n", ":", "\"", "*")  # common_params_sampling's default sequence breakers


class SamplerChain(Owned):
    """A ``llama_sampler`` chain. Build one with :meth:`for_config`, :meth:`greedy` or :meth:`sampling`."""

    _kind = "sampler"
    _close_order = None

    def __init__(self) -> None:
        library = _library.get()
        self._lib = library.lib
        params = library.lib.llama_sampler_chain_default_params()
        params.no_perf = True
        self._own(library.ffi, library.lib.llama_sampler_chain_init(params), library.lib.llama_sampler_free)
        self.grammar: Grammar | None = None  # kept outside the chain: see sample()
        self.stateless = False  # picking does not change the chain (greedy, nothing remembered)
        # Samplers in the chain that remember earlier tokens (penalties, DRY): llama-server shows
        # them the prompt; the grammar never sees it (owned by the chain, so never freed alone).
        self._prompt_samplers: list[Any] = []

    def _add(self, sampler: Any) -> None:
        # The chain takes ownership of each sampler added to it.
        self._lib.llama_sampler_chain_add(self.ptr, sampler)

    @classmethod
    def for_config(cls, config: StreamConfig, model: Model, *, n_ctx: int,
                   default_seed: int | None = None) -> SamplerChain:
        """The chain ``config`` describes for ``model`` in a context of ``n_ctx`` tokens (which
        ``repeat_last_n=-1`` means, as upstream), seeded by ``default_seed`` when the config sets none.

        Upstream's order: logit bias, grammar, then penalties, DRY, top-n-sigma, top-k, typical-p,
        top-p, min-p, XTC, temperature and the random pick (or temperature and mirostat). At
        temperature 0 the pick is greedy, and the samplers that can never drop the most likely
        token (top-k, top-p, min-p, top-n-sigma) are left out: the same token, less work.
        """
        chain = cls()
        lib = chain._lib
        n_vocab = model.vocab_size
        seed = config.seed if config.seed is not None else default_seed
        seed = RANDOM_SEED if seed is None else seed & 0xFFFFFFFF
        chain._add_logit_bias(model, config.logit_bias or {}, ban_eog=config.ignore_eos)
        grammar = config.grammar_text()
        if grammar is not None:
            lazy = config.tool_calls is not None and config.tool_calls.lazy and grammar == config.tool_calls.grammar
            chain.grammar = Grammar(model, grammar, triggers=config.tool_calls.triggers if lazy else None)
        if config.mirostat and not config.greedy:
            chain._add(lib.llama_sampler_init_temp(config.temperature))
            if config.mirostat == 1:
                chain._add(lib.llama_sampler_init_mirostat(n_vocab, seed, config.mirostat_tau,
                                                           config.mirostat_eta, 100))
            else:
                chain._add(lib.llama_sampler_init_mirostat_v2(seed, config.mirostat_tau, config.mirostat_eta))
            return chain
        last_n = n_ctx if config.repeat_last_n == -1 else config.repeat_last_n
        chain._add_penalties(n_vocab, config.repeat_penalty, last_n, config.frequency_penalty, config.presence_penalty)
        if config.dry_multiplier > 0 and config.dry_penalty_last_n != 0:
            chain._add_dry(model, config, n_ctx)
        greedy = config.greedy
        if config.top_n_sigma > 0 and not greedy:
            chain._add(lib.llama_sampler_init_top_n_sigma(config.top_n_sigma))
        if config.top_k > 0 and not greedy:
            chain._add(lib.llama_sampler_init_top_k(config.top_k))
        if config.typical_p < 1.0:
            chain._add(lib.llama_sampler_init_typical(config.typical_p, 0))
        if config.top_p < 1.0 and not greedy:
            chain._add(lib.llama_sampler_init_top_p(config.top_p, 0))
        if config.min_p > 0.0 and not greedy:
            chain._add(lib.llama_sampler_init_min_p(config.min_p, 0))
        if config.xtc_probability > 0 and config.xtc_threshold <= 0.5:
            chain._add(lib.llama_sampler_init_xtc(config.xtc_probability, config.xtc_threshold, 0, seed))
        if greedy:
            chain._add(lib.llama_sampler_init_greedy())
            chain.stateless = not chain._prompt_samplers and config.xtc_probability == 0
        else:
            chain._add(lib.llama_sampler_init_temp(config.temperature))
            chain._add(lib.llama_sampler_init_dist(seed))
        return chain

    @classmethod
    def greedy(cls) -> SamplerChain:
        """Always the most likely token, as upstream does at temperature 0."""
        chain = cls()
        chain._add(chain._lib.llama_sampler_init_greedy())
        return chain

    @classmethod
    def sampling(cls, *, n_vocab: int, temperature: float, top_k: int, top_p: float, min_p: float = 0.0,
                 repeat_penalty: float = 1.0, repeat_last_n: int = 64, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, seed: int | None = None) -> SamplerChain:
        """Random sampling in upstream's order: penalties, top-k, top-p, min-p, temperature, dist."""
        chain = cls()
        chain._add_penalties(n_vocab, repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty)
        chain._add_sampling(temperature, top_k, top_p, min_p, seed)
        return chain

    def _add_logit_bias(self, model: Model, user: Mapping[int, float], *, ban_eog: bool = False) -> None:
        """The user's biases, and -inf for the tokens the model file says never to generate, as
        upstream merges them; with ``ban_eog`` (``ignore_eos``) -inf for every end-of-generation token
        too, as llama-server does: generation goes on because none can be sampled."""
        lib, ffi = self._lib, self._ffi
        n_vocab = model.vocab_size
        for token in user:
            if token >= n_vocab:
                raise InvalidConfigError(f"StreamConfig.logit_bias names token {token}, but the vocabulary has "
                                         f"{n_vocab} tokens (0..{n_vocab - 1}).", field="logit_bias")
        count = ffi.new("int32_t *")
        suppressed = lib.llama_vocab_get_suppress_tokens(model._vocab_ptr(), count)
        merged = [(token, float(bias)) for token, bias in user.items()]
        if count[0] > 0 and suppressed != ffi.NULL:
            merged += [(suppressed[i], float("-inf")) for i in range(count[0])]
        if ban_eog:
            merged += [(token, float("-inf")) for token in model.eog_tokens()]
        if merged:
            biases = ffi.new("llama_logit_bias[]", len(merged))
            for i, (token, bias) in enumerate(merged):
                biases[i].token, biases[i].bias = token, bias
            self._add(lib.llama_sampler_init_logit_bias(n_vocab, len(merged), biases))

    def _add_dry(self, model: Model, config: StreamConfig, n_ctx: int) -> None:
        breakers = [self._ffi.new("char[]", breaker.encode()) for breaker in DRY_BREAKERS]
        array = self._ffi.new("const char *[]", breakers)
        last_n = n_ctx if config.dry_penalty_last_n == -1 else config.dry_penalty_last_n
        sampler = self._lib.llama_sampler_init_dry(model._vocab_ptr(), config.dry_multiplier, config.dry_base,
                                                   config.dry_allowed_length, last_n, array, len(breakers))
        self._add(sampler)
        self._prompt_samplers.append(sampler)

    def _add_penalties(self, n_vocab: int, repeat_penalty: float, repeat_last_n: int,
                       frequency_penalty: float, presence_penalty: float) -> None:
        if repeat_last_n == 0 or (repeat_penalty == 1.0 and frequency_penalty == 0.0 and presence_penalty == 0.0):
            return
        sampler = self._lib.llama_sampler_init_penalties(n_vocab, repeat_last_n, repeat_penalty,
                                                         frequency_penalty, presence_penalty)
        self._add(sampler)
        self._prompt_samplers.append(sampler)

    def _add_sampling(self, temperature: float, top_k: int, top_p: float, min_p: float, seed: int | None) -> None:
        lib = self._lib
        if top_k > 0:
            self._add(lib.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            self._add(lib.llama_sampler_init_top_p(top_p, 0))
        if min_p > 0.0:
            self._add(lib.llama_sampler_init_min_p(min_p, 0))
        self._add(lib.llama_sampler_init_temp(temperature))
        self._add(lib.llama_sampler_init_dist(RANDOM_SEED if seed is None else seed & 0xFFFFFFFF))

    def accept_prompt(self, tokens: Sequence[int]) -> None:
        """Show the prompt to the penalties and DRY, as llama-server does before sampling: a
        repeated prompt word is penalised like a repeated generated one."""
        accept = self._lib.llama_sampler_accept
        for sampler in self._prompt_samplers:
            for token in tokens:
                accept(sampler, token)

    def sample(self, ctx: Any, row: int) -> int:
        """Sample the next token from row ``row`` of the logits of ``ctx`` (and take it).

        With a grammar this is upstream's rejection sampling: the chain picks as if there were no
        grammar, and only when the grammar refuses that token is the grammar applied to the whole
        vocabulary and the pick made again. Checking one token is cheap; masking 49k-262k is not.
        """
        grammar, lib = self.grammar, self._lib
        if grammar is None:
            return int(lib.llama_sampler_sample(self._ptr, ctx, row))
        if self.stateless:  # greedy, no penalties: picking twice gives the same, and costs nothing more
            token = lib.llama_sampler_sample(self._ptr, ctx, row)
            if not grammar.allows(token):
                token = grammar.resample(self, ctx, row)
        else:
            preview = lib.llama_sampler_clone(self._ptr)  # a pick that leaves our state untouched
            try:
                token = lib.llama_sampler_sample(preview, ctx, row)
            finally:
                lib.llama_sampler_free(preview)
            if grammar.allows(token):
                token = lib.llama_sampler_sample(self._ptr, ctx, row)  # the same pick, now taken
            else:
                token = grammar.resample(self, ctx, row)
        grammar.accept(token)
        return int(token)

    def reset(self) -> None:
        self._lib.llama_sampler_reset(self.ptr)

    def accept(self, token: int) -> None:
        """Tell stateful samplers (penalties) about a token that is already in the text."""
        self._lib.llama_sampler_accept(self.ptr, token)


class Grammar(Owned):
    """A GBNF grammar's sampler, kept beside a chain (see :meth:`SamplerChain.sample`)."""

    _kind = "grammar"
    _close_order = None

    def __init__(self, model: Model, text: str, *, triggers: tuple[str, ...] | None = None) -> None:
        """``triggers`` (regular expressions) make the grammar lazy: it lets every token through until
        the output so far matches one, then constrains from the pattern's first group on."""
        library = _library.get()
        ffi, lib = library.ffi, library.lib
        self._lib = lib
        check_grammar(text)  # before llama.cpp's recursive parser sees it
        vocab = model._vocab_ptr()
        with _library.capture_output(_parser_error(text)) as said:
            if triggers:
                patterns = [ffi.new("char[]", pattern.encode("utf-8")) for pattern in triggers]
                pattern_array = ffi.new("char *[]", patterns)
                ptr = lib.llama_sampler_init_grammar_lazy_patterns(vocab, text.encode("utf-8"), b"root",
                                                                   pattern_array, len(patterns), ffi.NULL, 0)
            else:
                ptr = lib.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if ptr == ffi.NULL:
            reasons = [*said.log, *filter(None, [said.stderr])] or ["a syntax error, or no rule named root"]
            raise InvalidConfigError(f"llama.cpp could not use the grammar: {': '.join(reasons)}.")
        self._own(ffi, ptr, lib.llama_sampler_free)
        self._one = ffi.new("llama_token_data[1]")
        self._one_array = ffi.new("llama_token_data_array *", {"data": self._one, "size": 1, "selected": -1})
        self._n_vocab = model.vocab_size
        self._all: Any = None  # llama_token_data[n_vocab], made at the first resample
        self._all_array: Any = None

    def allows(self, token: int) -> bool:
        """Whether the grammar lets ``token`` come next."""
        one, array = self._one[0], self._one_array
        one.id, one.logit, one.p = token, 1.0, 0.0
        array.size, array.selected, array.sorted = 1, -1, False
        self._lib.llama_sampler_apply(self._ptr, array)
        return bool(one.logit != NEG_INF)

    def resample(self, chain: SamplerChain, ctx: Any, row: int) -> int:
        """Pick again from the whole vocabulary with the grammar applied first (and let ``chain`` take it)."""
        lib = self._lib
        array = self._candidates(lib.llama_get_logits_ith(ctx, row))
        lib.llama_sampler_apply(self._ptr, array)
        if not any_allowed(self._ffi, array):
            raise StreamingError("the grammar allows no token here (its language is empty, or it cannot go on "
                                 "from the text so far): generation stopped")
        lib.llama_sampler_apply(chain.ptr, array)
        token = int(array.data[array.selected].id)
        if not self.allows(token):  # never hand the grammar a token it refused: llama.cpp aborts the process
            raise StreamingError(f"the sampler picked token {token}, which the grammar does not allow: "
                                 "generation stopped")
        lib.llama_sampler_accept(chain.ptr, token)
        return token

    def accept(self, token: int) -> None:
        self._lib.llama_sampler_accept(self._ptr, token)

    def _candidates(self, logits: Any) -> Any:
        """Every token with its logit, as llama.cpp's samplers take them."""
        ffi, n = self._ffi, self._n_vocab
        if self._all is None:
            self._all = ffi.new("llama_token_data[]", n)
            self._all_array = ffi.new("llama_token_data_array *", {"data": self._all, "size": n, "selected": -1})
        fill_candidates(ffi, self._all, logits, n)
        array = self._all_array
        array.size, array.selected, array.sorted = n, -1, False
        return array


NEG_INF = float("-inf")
PARSER_ERROR = "parse: error parsing grammar: "  # how llama.cpp's grammar parser begins its fprintf to stderr
MAX_REASON = 300  # characters of the parser's reason kept in a message (it may quote the rest of the grammar)


def _parser_error(grammar: str) -> Callable[[str], tuple[str, str]]:
    """For :func:`_library.capture_output`: the error llama.cpp's grammar parser printed for ``grammar``
    (``parse: error parsing grammar: <reason>\\n\\n<grammar>\\n``), as its reason on one line, and the rest."""
    end_marker = f"\n\n{grammar}\n"

    def claim(text: str) -> tuple[str, str]:
        start = text.find(PARSER_ERROR)
        end = text.find(end_marker, start)
        if start < 0 or end < 0:
            return "", text
        reason = text[start + len(PARSER_ERROR):end].strip().replace("\n", "\\n")
        if len(reason) > MAX_REASON:
            reason = reason[:MAX_REASON] + "..."
        return reason, text[:start] + text[end + len(end_marker):]

    return claim


def any_allowed(ffi: Any, array: Any) -> bool:
    """Whether any candidate of ``array`` (a ``llama_token_data_array *``) has a logit above -inf."""
    from ._logprobs import _numpy_module

    numpy = _numpy_module()
    n = int(array.size)
    if numpy is not None:
        view = numpy.frombuffer(ffi.buffer(array.data, 12 * n), dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        return bool((view["logit"] != NEG_INF).any())
    return any(array.data[i].logit != NEG_INF for i in range(n))


def fill_candidates(ffi: Any, data: Any, logits: Any, n: int) -> None:
    """data[i] = (i, logits[i], 0) for every token: with numpy in one vectorised copy, else one by one."""
    from ._logprobs import _numpy_module

    numpy = _numpy_module()
    if numpy is not None:
        view = numpy.frombuffer(ffi.buffer(data, 12 * n), dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        view["id"] = numpy.arange(n, dtype=numpy.int32)
        view["logit"] = numpy.frombuffer(ffi.buffer(logits, 4 * n), dtype=numpy.float32)
        view["p"] = 0.0
        return
    for i in range(n):
        item = data[i]
        item.id, item.logit, item.p = i, logits[i], 0.0
