"""A draft model for speculative decoding: a smaller model with the same vocabulary guesses ahead.

``Context(model, draft_model=small)`` keeps a second context on ``small``; with
``StreamConfig(speculative="draft")`` each step that context is brought to the target's tokens (its
cache reused up to where they part), decodes the token just sampled and then picks greedily, one
decode per drafted token, ``draft_max`` of them (upstream's draft-simple with ``--spec-draft-p-min 0``:
the most likely token each time). The target verifies the draft like any other (mullama.generate.
_speculative), so the output never depends on the draft model, only the speed does.

A prompt with images or audio is decoded without the draft model's drafts (n-gram drafts still apply):
its media positions hold the target projector's embeddings, which a draft model of another width
cannot read (upstream feeds it zero rows there, and its drafts after the media are poor). The answer is
the same; only that request is not sped up.

The vocabularies must agree as upstream's ``common_speculative_are_compatible`` requires: the same
vocabulary type, the same BOS/EOS use and ids, sizes within 128 tokens, the same text for every token
from id 5 on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._exceptions import InvalidConfigError
from ._sampler import SamplerChain

if TYPE_CHECKING:
    from ._context import Context
    from ._model import Model

__all__ = ["DraftModelDrafter", "check_draft_model", "no_draft_model_error"]

VOCAB_SIZE_SLACK = 128  # upstream's SPEC_VOCAB_MAX_SIZE_DIFFERENCE
CHECK_FROM = 5  # upstream's SPEC_VOCAB_CHECK_START_TOKEN_ID


def check_draft_model(target: Model, draft: Model) -> None:
    """Raise InvalidConfigError unless ``draft`` is a Model that can draft for ``target`` (upstream's
    vocabulary checks)."""
    if not isinstance(draft, type(target)):
        raise InvalidConfigError(f"draft_model must be a mullama.Model, not {type(draft).__name__}.")
    lib = target._library.lib
    tv, dv = target._vocab_ptr(), draft._vocab_ptr()
    problem = None
    if lib.llama_vocab_type(tv) != lib.llama_vocab_type(dv):
        problem = "their tokenizers are of different types"
    elif lib.llama_vocab_get_add_bos(tv) != lib.llama_vocab_get_add_bos(dv) or (
            lib.llama_vocab_get_add_bos(tv) and target.bos_token_id != draft.bos_token_id):
        problem = "they start prompts differently (BOS)"
    elif lib.llama_vocab_get_add_eos(tv) != lib.llama_vocab_get_add_eos(dv) or (
            lib.llama_vocab_get_add_eos(tv) and target.eos_token_id != draft.eos_token_id):
        problem = "they end prompts differently (EOS)"
    elif abs(target.vocab_size - draft.vocab_size) > VOCAB_SIZE_SLACK:
        problem = f"their vocabularies have {target.vocab_size} and {draft.vocab_size} tokens"
    else:
        ffi = target._library.ffi
        for token in range(CHECK_FROM, min(target.vocab_size, draft.vocab_size)):
            if ffi.string(lib.llama_vocab_get_text(tv, token)) != ffi.string(lib.llama_vocab_get_text(dv, token)):
                problem = f"token {token} differs"
                break
    if problem is not None:
        raise InvalidConfigError(f"the draft model {draft.path.name} cannot draft for {target.path.name}: "
                                 f"{problem}. A draft model must share the target's vocabulary (a smaller model of "
                                 "the same family, or the same model quantized smaller).")


def no_draft_model_error() -> InvalidConfigError:
    """The error for ``speculative="draft"`` where no draft model was given, wherever it is asked for."""
    return InvalidConfigError('speculative="draft" needs a draft model: Context(model, draft_model=Model.load(...)), '
                              "AsyncModel.load(path, draft_model=...), or -md FNAME on the command line.")


class DraftModelDrafter:
    """Drafts with a draft model's context, greedily (one per generation: it owns no C object)."""

    __slots__ = ("_context", "_greedy", "n_max")

    def __init__(self, context: Context, n_max: int) -> None:
        self._context = context
        self._greedy = SamplerChain.greedy()
        self.n_max = n_max

    def draft(self, history: list[int], sampled: int, room: int) -> list[int]:
        """Up to ``min(draft_max, room)`` tokens the draft model expects after ``history`` and ``sampled``."""
        count = min(self.n_max, room)
        if count <= 0:
            return []
        context = self._context
        context._prepare_prompt([*history, sampled])  # its cache reused up to where it parts from the target's
        ptr, sample = context.ptr, self._greedy.sample
        out = [sample(ptr, -1)]
        while len(out) < count:
            context._decode(out[-1:])
            out.append(sample(ptr, -1))
        return out

    def verified(self, proposed: int, accepted: int) -> None:
        """Nothing to learn: the draft model's cache is brought to the target's tokens at the next draft."""

    def close(self) -> None:
        self._greedy.close()
