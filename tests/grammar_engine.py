"""llama.cpp's grammar engine, for the JSON Schema tests: does a grammar compile, which strings it accepts.

"Accepts" is what constrained generation can produce: a string is fed token by token to the real
grammar sampler (llama_sampler_apply on one candidate, then the end-of-generation token). Shared by
tests/test_json_schema.py (upstream's cases, the corpus) and tests/test_json_schema_languages.py.
"""

from __future__ import annotations

import mullama
from mullama.native import _library
from mullama.structured._json_schema import json_schema_to_grammar


class Engine:
    def __init__(self, model: mullama.Model) -> None:
        library = _library.get()
        self.lib, self.ffi, self.model = library.lib, library.ffi, model
        self.vocab = model._vocab_ptr()
        self.eos = model.eos_token_id

    def compiles(self, grammar: str) -> bool:
        sampler = self.lib.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if sampler == self.ffi.NULL:
            return False
        self.lib.llama_sampler_free(sampler)
        return True

    def acceptor(self, grammar: str) -> Acceptor:
        sampler = self.lib.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert sampler != self.ffi.NULL, f"llama.cpp refused the grammar:\n{grammar}"
        return Acceptor(self, sampler)


class Acceptor:
    """``accepts(text)``: llama.cpp's grammar sampler lets ``text`` through, then lets it end."""

    def __init__(self, engine: Engine, sampler) -> None:
        self.engine, self.sampler = engine, sampler
        self.data = engine.ffi.new("llama_token_data[1]")
        self.array = engine.ffi.new("llama_token_data_array *", {"data": self.data, "size": 1, "selected": -1,
                                                                  "sorted": False})

    def accepts(self, text: str) -> bool:
        lib = self.engine.lib
        state = lib.llama_sampler_clone(self.sampler)
        try:
            tokens = [*self.engine.model.tokenize(text, add_special=False), self.engine.eos]
            for token in tokens:
                self.data[0].id, self.data[0].logit, self.data[0].p = token, 0.0, 0.0
                lib.llama_sampler_apply(state, self.array)
                if self.data[0].logit == float("-inf"):
                    return False
                if token != self.engine.eos:
                    lib.llama_sampler_accept(state, token)  # only ever a token the grammar allows
            return True
        finally:
            lib.llama_sampler_free(state)

    def close(self) -> None:
        self.engine.lib.llama_sampler_free(self.sampler)

    def __enter__(self) -> Acceptor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def language(engine: Engine, schema, texts) -> dict[str, bool]:
    with engine.acceptor(json_schema_to_grammar(schema)) as acceptor:
        return {text: acceptor.accepts(text) for text in texts}
