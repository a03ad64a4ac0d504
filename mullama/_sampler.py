"""llama.cpp's own sampler chain, configured from Python (no sampling in Python).

The chain is built in the order of upstream's ``common_sampler`` (what llama-server and
llama-cli use): the model's suppressed tokens as a logit bias, then penalties, top-k,
top-p, min-p, temperature and the final pick. At ``temperature=0`` the pick is greedy,
after the penalties, exactly as upstream's chain picks the most likely token at
temperature 0 (its temperature sampler keeps only the maximum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import _library
from ._owned import Owned

if TYPE_CHECKING:
    from ._config import StreamConfig
    from ._model import Model

__all__ = ["SamplerChain"]

RANDOM_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: llama.cpp draws a random seed


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
        self.penalty_last_n = 0  # how many recent tokens the penalties look at (0: no penalties)

    def _add(self, sampler: Any) -> None:
        # The chain takes ownership of each sampler added to it.
        self._lib.llama_sampler_chain_add(self.ptr, sampler)

    @classmethod
    def for_config(cls, config: StreamConfig, model: Model, *, n_ctx: int,
                   default_seed: int | None = None) -> SamplerChain:
        """The chain ``config`` describes for ``model`` in a context of ``n_ctx`` tokens (which
        ``repeat_last_n=-1`` means, as upstream), seeded by ``default_seed`` when the config sets none."""
        chain = cls()
        chain._add_suppressed(model)
        last_n = n_ctx if config.repeat_last_n == -1 else config.repeat_last_n
        chain._add_penalties(model.vocab_size, config.repeat_penalty, last_n,
                             config.frequency_penalty, config.presence_penalty)
        if config.greedy:
            chain._add(chain._lib.llama_sampler_init_greedy())
            return chain
        chain._add_sampling(config.temperature, config.top_k, config.top_p, config.min_p,
                            config.seed if config.seed is not None else default_seed)
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

    def _add_suppressed(self, model: Model) -> None:
        """Tokens the model file says never to generate get a bias of -inf, as upstream does."""
        lib, ffi = self._lib, self._ffi
        count = ffi.new("int32_t *")
        tokens = lib.llama_vocab_get_suppress_tokens(model._vocab_ptr(), count)
        if count[0] > 0 and tokens != ffi.NULL:
            biases = ffi.new("llama_logit_bias[]", count[0])
            for i in range(count[0]):
                biases[i].token, biases[i].bias = tokens[i], float("-inf")
            self._add(lib.llama_sampler_init_logit_bias(model.vocab_size, count[0], biases))

    def _add_penalties(self, n_vocab: int, repeat_penalty: float, repeat_last_n: int,
                       frequency_penalty: float, presence_penalty: float) -> None:
        if repeat_last_n == 0 or (repeat_penalty == 1.0 and frequency_penalty == 0.0 and presence_penalty == 0.0):
            return
        self.penalty_last_n = repeat_last_n
        self._add(self._lib.llama_sampler_init_penalties(n_vocab, repeat_last_n, repeat_penalty,
                                                         frequency_penalty, presence_penalty))

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
        """Show the prompt to the penalties, as llama-server does before sampling: a repeated
        prompt word is penalised like a repeated generated one."""
        if not self.penalty_last_n:
            return
        recent = tokens[-self.penalty_last_n:]
        accept, ptr = self._lib.llama_sampler_accept, self.ptr
        for token in recent:
            accept(ptr, token)

    def reset(self) -> None:
        self._lib.llama_sampler_reset(self.ptr)

    def accept(self, token: int) -> None:
        """Tell stateful samplers (penalties) about a token that is already in the text."""
        self._lib.llama_sampler_accept(self.ptr, token)
