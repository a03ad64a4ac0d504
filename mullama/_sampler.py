"""llama.cpp's own sampler chain, configured from Python (no sampling in Python)."""

from __future__ import annotations

from typing import Any

from . import _library
from ._owned import Owned

__all__ = ["SamplerChain"]


class SamplerChain(Owned):
    """A ``llama_sampler`` chain. Build one with :meth:`greedy` or :meth:`sampling`."""

    _kind = "sampler"

    def __init__(self) -> None:
        library = _library.get()
        self._lib = library.lib
        params = library.lib.llama_sampler_chain_default_params()
        params.no_perf = True
        self._own(library.ffi, library.lib.llama_sampler_chain_init(params), library.lib.llama_sampler_free)

    def _add(self, sampler: Any) -> None:
        # The chain takes ownership of each sampler added to it.
        self._lib.llama_sampler_chain_add(self.ptr, sampler)

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
        lib = chain._lib
        if repeat_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0:
            chain._add(lib.llama_sampler_init_penalties(n_vocab, repeat_last_n, repeat_penalty,
                                                        frequency_penalty, presence_penalty))
        if top_k > 0:
            chain._add(lib.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            chain._add(lib.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            chain._add(lib.llama_sampler_init_min_p(min_p, 1))
        chain._add(lib.llama_sampler_init_temp(temperature))
        chain._add(lib.llama_sampler_init_dist(0xFFFFFFFF if seed is None else seed & 0xFFFFFFFF))
        return chain

    def reset(self) -> None:
        self._lib.llama_sampler_reset(self.ptr)

    def accept(self, token: int) -> None:
        """Tell stateful samplers (penalties) about a token that is already in the text."""
        self._lib.llama_sampler_accept(self.ptr, token)
