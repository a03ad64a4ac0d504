"""Embeddings: a vector per text (or per token), computed as llama.cpp computes them.

A model's embeddings come from a context of its own, created with ``embeddings`` on, the
pooling asked for, and a physical batch as large as its logical one: with mean, CLS or
last-token pooling a text's tokens must be pooled within one micro-batch, as llama-server
requires (its "input is too large to process" error). Many texts go through one
``llama_decode`` as separate sequences, as upstream's embedding example packs them; the
cache is cleared before each batch. Encoder-only models (BERT) run ``llama_encode``.

Batching must not change a vector. ggml's CPU kernels change with the number of rows in a
batch: K-quant (and i-quant) matrix products take a tiled kernel from 8 rows on (models
without such weights skip that size), flash attention a tiled
kernel from 64 query rows on (whose tiles over the cache then start at other places for a
text that does not start the batch), and they sum in other orders. A text's vector moved by
up to 1e-2 when it shared a decode across those sizes (llama-server's own parallel slots,
which batch that way, differ from its one-at-a-time answers by up to 0.2 on this pin). So a
text shares decodes only with texts of its size class, within the class's bound: under 8
tokens, decodes of at most 7; under 64, of at most 63; a text of 64 tokens or more has a
decode of its own (it fills one anyway). Every vector then equals the one llama-server gives
for its text alone. (Weights that ggml repacks for the CPU, such as Q4_K on AVX2, are
computed in groups of four rows; there a shared decode can still move the last bits.)

Concurrent callers batch together: whoever gets to decode first also takes the texts that
others queued meanwhile, so N threads (or N server requests) embedding at once share each
decode, and nobody waits for a separate thread. Each caller normalises and converts its own
vectors, outside the lock. A caller may pass a ``cancel`` event (a server, when its client leaves):
its texts not decoded yet are left out of the decodes still to come, and it gets a CANCELLED error;
texts stay packed as they were, so nothing else changes.
"""

from __future__ import annotations

import array
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from .._exceptions import (
    ContextOverflowError,
    InvalidConfigError,
    RequestCancelledError,
    StreamingError,
    decode_error,
)
from ..native._owned import Owned
from ._batch import TokenBatch
from ._context_params import ContextSettings, adopt_context, check_count, create_context

if TYPE_CHECKING:
    from ._model import Model

__all__ = ["DEFAULT_BATCH_SIZE", "POOLINGS", "POOLING_RANK", "Embedder", "embed", "pooling_name"]

# llama_pooling_type values by name ("rank" is for rerankers: a score, not an embedding).
POOLINGS = {"none": 0, "mean": 1, "cls": 2, "last": 3}
POOLING_RANK = 4  # a reranker's classification head: n_cls_out scores per text (see _rerank)
DEFAULT_BATCH_SIZE = 512  # tokens per decode, and the longest text (llama-server's n_ubatch)
KERNEL_SIZES = (8, 64)  # batch sizes (rows) from which ggml's CPU kernels change (see above)
# Weight types whose products ggml's CPU computes with its tiled kernel from 8 rows on (ggml-cpu/tiled).
TILED_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
               "IQ1_S", "IQ1_M")
MAX_BATCH_SIZE = 1 << 20


def pooling_name(value: int) -> str | None:
    """The name of a llama_pooling_type value, None for one embeddings do not use."""
    return next((name for name, number in POOLINGS.items() if number == value), None)


def size_class(n_tokens: int, batch_size: int, kernel_sizes: tuple[int, ...]) -> int:
    """The most tokens a decode holding a text of ``n_tokens`` may have, so that ggml computes the
    text with the kernels it would use for the text alone (the text's own length: alone)."""
    for size in kernel_sizes:
        if n_tokens < size:
            return min(size - 1, batch_size)
    return n_tokens


def kernel_sizes(model: Model) -> tuple[int, ...]:
    """The batch sizes at which ggml's kernels change for ``model``'s weights."""
    from ..gguf._reader import read_gguf_info

    lib = model._library.lib
    tiled = {getattr(lib, f"GGML_TYPE_{name}") for name in TILED_TYPES}
    types = read_gguf_info(model.path).tensor_types
    return KERNEL_SIZES if tiled & set(types) else tuple(size for size in KERNEL_SIZES if size != 8)


class _Job:
    """One caller's texts (as tokens) and, once decoded, their raw float32 vectors."""

    __slots__ = ("cancel", "error", "results", "texts")

    def __init__(self, texts: list[list[int]], cancel: threading.Event | None) -> None:
        self.texts = texts
        self.results: list[list[bytes] | None] = [None] * len(texts)  # per text: one vector, or one per token
        self.error: BaseException | None = None
        self.cancel = cancel

    def wanted(self) -> bool:
        """Whether its texts are still to be decoded: no error, and not cancelled (which becomes its error)."""
        if self.error is None and self.cancel is not None and self.cancel.is_set():
            self.error = RequestCancelledError("the embedding was cancelled: its caller stopped waiting for it.")
        return self.error is None


class Embedder(Owned):
    """An embedding context of one model: ``batch_size`` tokens per decode, one pooling.

    Made and kept by :class:`~mullama.Model` (``model.embed`` creates it on first use and
    frees it with the model). It holds no reference to the model, so no cycle keeps either alive.
    """

    _kind = "embedder"

    def __init__(self, model: Model, pooling: int, batch_size: int, n_threads: int | None = None) -> None:
        settings = ContextSettings(n_ctx=batch_size, n_batch=batch_size, n_threads=n_threads,
                                   n_seq_max=min(KERNEL_SIZES[-1], batch_size), embeddings=True, pooling=pooling)
        library = model._library
        self._lib, ffi = library.lib, library.ffi
        ptr = create_context(model, settings)
        adopt_context(self, model, ptr, settings, warmup=False)
        lib = self._lib
        self.pooling = pooling
        self.batch_size = lib.llama_n_batch(ptr)
        # rank pooling gives each text the head's n_cls_out scores, not a vector
        self.n_embd = (lib.llama_model_n_cls_out(model.ptr) if pooling == POOLING_RANK
                       else lib.llama_model_n_embd_out(model.ptr))
        self.max_sequences = lib.llama_n_seq_max(ptr)
        self.kernel_sizes = kernel_sizes(model)
        model_ptr = model.ptr
        self._encode_only = bool(lib.llama_model_has_encoder(model_ptr) and not lib.llama_model_has_decoder(model_ptr))
        self._memory = lib.llama_get_memory(ptr)
        self._compute = library.compute
        self._lock = library.compute.lock_for(model.offloaded)
        self._relays = model._relays  # checked after each decode (an RPC server may be lost)
        self._batch = TokenBatch(lib, self.batch_size)
        self._vector_bytes = 4 * self.n_embd
        self._ffi = ffi
        self._pending: list[_Job] = []
        self._pending_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self.decodes = 0  # llama_decode calls so far (concurrent callers share them)

    def close(self) -> None:
        """Free the context (waits for a decode in progress)."""
        with self._run_lock:
            self._batch.close()
            super().close()

    def run(self, texts: list[list[int]], cancel: threading.Event | None = None) -> list[list[bytes]]:
        """Raw float32 vectors of each text (token lists checked by the caller): one per text, or
        one per token with pooling "none". Decodes this caller's texts together with those of
        every caller waiting meanwhile. Once ``cancel`` is set, its texts are left out of the
        decodes still to come and a RequestCancelledError (CANCELLED) is raised."""
        job = _Job(texts, cancel)
        with self._pending_lock:
            self._pending.append(job)
        with self._run_lock:
            with self._pending_lock:
                jobs, self._pending = self._pending, []
            if jobs:
                self.ensure_open()
                with self._compute.busy():
                    self._decode_jobs(jobs)
        if job.error is not None:
            raise job.error
        return job.results  # type: ignore[return-value]  # every entry is set when no error is

    def _decode_jobs(self, jobs: list[_Job]) -> None:
        """Pack the jobs' texts into decodes, each text with texts of its size class only, within
        the class's bound (see the module's docstring)."""
        pending: dict[int, tuple[list[tuple[_Job, int]], int]] = {}  # class bound -> (members, tokens)
        for job in jobs:
            for index, tokens in enumerate(job.texts):
                bound = size_class(len(tokens), self.batch_size, self.kernel_sizes)
                members, n_tokens = pending.get(bound, ([], 0))
                if members and (n_tokens + len(tokens) > bound or len(members) == self.max_sequences):
                    self._decode_batch(members)
                    members, n_tokens = [], 0
                members.append((job, index))
                pending[bound] = (members, n_tokens + len(tokens))
        for members, _ in pending.values():
            self._decode_batch(members)

    def _decode_batch(self, members: list[tuple[_Job, int]]) -> None:
        members = [(job, index) for job, index in members if job.wanted()]
        if not members:
            return
        batch, n = self._batch, 0
        for seq_id, (job, index) in enumerate(members):
            n = batch.put_run(n, job.texts[index], 0, seq_id)  # pooling needs every token's output
        if self._memory != self._ffi.NULL:
            self._lib.llama_memory_clear(self._memory, True)
        with self._lock:
            rc = batch.decode(self.ptr, n, encode=self._encode_only)
        self.decodes += 1
        lost = self._relays.error(self._lib, self.ptr)
        if rc != 0 or lost:
            error = lost or decode_error(rc, n_ctx=self.batch_size, processed=0)
            for job, _ in members:
                job.error = error
            return
        self._collect(members)

    def _collect(self, members: list[tuple[_Job, int]]) -> None:
        lib, ffi, ptr, size = self._lib, self._ffi, self._ptr, self._vector_bytes
        row = 0
        for seq_id, (job, index) in enumerate(members):
            n_tokens = len(job.texts[index])
            if self.pooling == POOLINGS["none"]:
                vectors = [ffi.buffer(lib.llama_get_embeddings_ith(ptr, row + i), size)[:] for i in range(n_tokens)]
            else:
                pooled = lib.llama_get_embeddings_seq(ptr, seq_id)
                if pooled == ffi.NULL:
                    job.error = StreamingError(f"llama.cpp returned no embedding for text {index}; enable logging for "
                                               "'mullama.llama_cpp' to see why.")
                    continue
                vectors = [ffi.buffer(pooled, size)[:]]
            row += n_tokens
            job.results[index] = vectors


def _texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, (str, Sequence)):
        raise InvalidConfigError(f"embed() takes a str or a list of str, not {type(texts).__name__}.")
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise InvalidConfigError("embed() was given no texts; pass a str or a non-empty list of str.")
    for index, text in enumerate(items):
        if not isinstance(text, str):
            raise InvalidConfigError(f"text {index} is a {type(text).__name__}, not a str.")
    return items


def resolve_pooling(model: Model, pooling: str | None) -> int:
    """The llama_pooling_type to use: the one asked for, else the GGUF's, else mean."""
    if pooling is None:
        value = model.pooling
        return POOLINGS[value] if value in POOLINGS else POOLINGS["mean"]
    if not isinstance(pooling, str) or pooling not in POOLINGS:
        raise InvalidConfigError(f"pooling must be one of {', '.join(map(repr, POOLINGS))} or None "
                                 f"(the model's own), not {pooling!r}.")
    return POOLINGS[pooling]


def fit(tokens: list[int], index: int, batch_size: int, truncate: bool) -> list[int]:
    """``tokens`` if they fit in one batch; the first batch_size of them when truncating; else CONTEXT_OVERFLOW.
    No tokens (an empty text) is INVALID_CONFIG: it has no embedding."""
    if not tokens:
        raise InvalidConfigError(f"text {index} is empty; an empty text has no embedding.")
    if len(tokens) <= batch_size:
        return tokens
    if truncate:
        return tokens[:batch_size]
    raise ContextOverflowError(f"text {index} has {len(tokens)} tokens but an embedding batch holds {batch_size}; "
                               "pass a larger batch_size, or truncate=True to embed its beginning.")


def normalized(vector: list[float]) -> list[float]:
    """``vector`` scaled to unit length (Euclidean), as llama.cpp's common_embd_normalize(…, 2)."""
    norm = math.sqrt(math.fsum(x * x for x in vector))
    scale = 1.0 / norm if norm > 0 else 0.0
    return [x * scale for x in vector]


def to_lists(raw: list[list[bytes]], pooled: bool, normalize: bool) -> list[Any]:
    """Raw float32 vectors as lists of floats (one per text, or a list per text with pooling "none")."""
    def convert(data: bytes) -> list[float]:
        vector = array.array("f", data).tolist()
        return normalized(vector) if normalize else vector

    if pooled:
        return [convert(vectors[0]) for vectors in raw]
    return [[convert(vector) for vector in vectors] for vectors in raw]


def to_numpy(raw: list[list[bytes]], pooled: bool, normalize: bool, n_embd: int) -> Any:
    """One float32 array (texts x n_embd); with pooling "none", a list of (tokens x n_embd) arrays."""
    try:
        import numpy as np
    except ImportError:
        raise InvalidConfigError("as_numpy=True needs numpy; install it, or leave as_numpy off for lists.") from None

    def stack(vectors: list[bytes]) -> Any:
        matrix = np.frombuffer(b"".join(vectors), dtype=np.float32).reshape(len(vectors), n_embd)
        if not normalize:
            return matrix.copy()
        norms = np.sqrt(np.square(matrix, dtype=np.float64).sum(axis=1, keepdims=True))
        scale = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
        return (matrix * scale).astype(np.float32)

    if pooled:
        return stack([vectors[0] for vectors in raw])
    return [stack(vectors) for vectors in raw]


def check_options(normalize: Any, batch_size: Any, truncate: Any) -> None:
    if not isinstance(normalize, bool):
        raise InvalidConfigError(f"normalize must be True or False, not {normalize!r}.")
    if not isinstance(truncate, bool):
        raise InvalidConfigError(f"truncate must be True or False, not {truncate!r}.")
    check_count("batch_size", batch_size, MAX_BATCH_SIZE)


def embed(model: Model, texts: str | Sequence[str] | Sequence[Sequence[int]], *, pooling: str | None = None,
          normalize: bool = True, batch_size: int | None = None, truncate: bool = False,
          as_numpy: bool = False, cancel: threading.Event | None = None) -> Any:
    """What :meth:`mullama.Model.embed` returns (see there); ``cancel`` as for Embedder.run."""
    check_options(normalize, batch_size, truncate)
    kind = resolve_pooling(model, pooling)
    token_lists: list[list[int]]
    if _is_token_lists(texts):
        token_lists = [list(tokens) for tokens in cast("Sequence[Sequence[int]]", texts)]
        for tokens in token_lists:
            model._check_tokens(tokens)
    else:
        token_lists = [model.tokenize(text, add_special=True, parse_special=True)
                       for text in _texts(cast("str | Sequence[str]", texts))]
    size = batch_size or DEFAULT_BATCH_SIZE
    token_lists = [fit(tokens, index, size, truncate) for index, tokens in enumerate(token_lists)]
    embedder = model._embedder(kind, size)
    raw = embedder.run(token_lists, cancel)
    pooled = kind != POOLINGS["none"]
    if as_numpy:
        return to_numpy(raw, pooled, normalize, embedder.n_embd)
    return to_lists(raw, pooled, normalize)


def _is_token_lists(texts: Any) -> bool:
    """Whether ``texts`` is a non-empty list of token-id lists (already tokenised input)."""
    return (isinstance(texts, Sequence) and not isinstance(texts, (str, bytes)) and len(texts) > 0
            and all(isinstance(item, (list, tuple)) for item in texts))
