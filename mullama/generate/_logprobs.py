"""Log-probabilities of a sampled token and of the most likely ones, as llama-server reports them.

They come from the model's raw distribution at that step: the softmax of its logits, before
any sampler (temperature, penalties, grammar) changed them — what llama-server's ``n_probs``
and OpenAI's ``logprobs`` report. Computed only for streams that ask (``logprobs=K``): with
numpy installed it takes a fraction of a millisecond over a whole vocabulary; without it,
plain Python takes a few milliseconds.
"""

from __future__ import annotations

import array
import heapq
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["TopLogprob", "token_logprobs"]

_numpy: list[Any] = []  # [numpy or None], imported on first use: `import mullama` stays light


def _numpy_module() -> Any:
    if not _numpy:
        try:
            import numpy

            _numpy.append(numpy)
        except ImportError:  # optional: plain Python below
            _numpy.append(None)
    return _numpy[0]


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the most likely tokens at a step: its id, its text (``bytes`` exactly), its logprob."""

    id: int
    text: str
    logprob: float
    bytes: bytes


def token_logprobs(ffi: Any, logits: Any, n_vocab: int, chosen: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The logprob of ``chosen`` and the ``k`` most likely (id, logprob), most likely first, from the
    ``n_vocab`` floats at ``logits``."""
    raw = ffi.buffer(logits, 4 * n_vocab)
    numpy = _numpy_module()
    if numpy is not None:
        values = numpy.frombuffer(raw, dtype=numpy.float32).astype(numpy.float64)
        top = numpy.argpartition(-values, k - 1)[:k] if 0 < k < n_vocab else numpy.arange(n_vocab if k else 0)
        top = top[numpy.lexsort((top, -values[top]))]
        peak = float(values.max())
        log_total = peak + math.log(float(numpy.exp(values - peak).sum()))
        return float(values[chosen]) - log_total, [(int(i), float(values[i]) - log_total) for i in top]
    floats = array.array("f")
    floats.frombytes(bytes(raw))
    peak = max(floats)
    log_total = peak + math.log(math.fsum(math.exp(x - peak) for x in floats))
    top_ids = heapq.nlargest(k, range(n_vocab), key=floats.__getitem__) if k else []
    return floats[chosen] - log_total, [(i, floats[i] - log_total) for i in top_ids]
