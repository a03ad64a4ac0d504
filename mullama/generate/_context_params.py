"""The parameters of a llama.cpp context, checked and set as llama-server sets them.

``Context`` (one sequence) and the batching engine (many) both create their llama
context here. The values start from ``llama_context_default_params()`` and are then
changed exactly as upstream's ``common_context_params_to_llama`` changes them with
``common_params``' defaults (what llama-server runs with): a sliding-window cache of
the window's size (``swa_full`` off), performance counters on, a logical batch of 2048
over physical batches of 512. Greedy output then equals llama-server's token for token,
also on models with sliding-window attention (Gemma 3), where ``swa_full`` changes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .._exceptions import ContextError, InvalidConfigError
from ..native._compute import MAX_THREADS, default_threads

if TYPE_CHECKING:
    from ..native._owned import Owned
    from ._model import Model
    from ._positions import CachePositions

__all__ = [
    "MIN_CTX",
    "ContextSettings",
    "adopt_context",
    "check_n_ctx",
    "chunk_end",
    "common_prefix",
    "create_context",
    "default_n_ctx",
    "default_threads",
    "prompt_breaks",
    "reusable_prefix",
    "trim_cache",
]

DEFAULT_MAX_CTX = 4096  # a new context holds at most this many tokens unless asked for more
DEFAULT_BATCH = 2048  # common_params.n_batch
DEFAULT_UBATCH = 512  # common_params.n_ubatch
MAX_SEQUENCES = 256  # LLAMA_MAX_SEQ
MAX_UINT32 = 2**32 - 1
# llama.cpp rounds a context (and each sequence's share of it) up to a multiple of 256 tokens
# (GGML_PAD in llama_context's constructor): a smaller one would silently become 256.
MIN_CTX = 256


def default_n_ctx(model: Model) -> int:
    """Tokens per sequence when none is asked for: the trained length, at most 4096."""
    return min(model.n_ctx_train, DEFAULT_MAX_CTX)


def prompt_breaks(model: Model, n_prompt: int, n_batch: int) -> tuple[int, ...]:
    """Positions where llama-server ends a prompt batch early, for a model whose cache cannot be
    rolled back token by token (sliding-window attention, recurrent state): 4 + n_ubatch and 4
    tokens before the prompt's end, where it saves a checkpoint of the cache. Where batches end
    changes the floating-point sums, so ours end at the same places to give the same tokens."""
    if not model.needs_checkpoints:
        return ()
    ends = {n_prompt - min(n_batch, offset) for offset in (4 + DEFAULT_UBATCH, 4)}
    return tuple(sorted(end for end in ends if end > 0))


def chunk_end(position: int, room: int, breaks: tuple[int, ...]) -> int:
    """Where a prompt batch starting at ``position`` with ``room`` tokens free ends (before ``breaks``)."""
    end = position + room
    for stop in breaks:
        if position < stop < end:
            return stop
    return end


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share at their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def reusable_prefix(cached: list[int], prompt: list[int], reuse: bool) -> int:
    """How many of ``prompt``'s tokens a cache that holds ``cached`` keeps: their common prefix, less
    at least the prompt's last token (logits exist only for the last token decoded); none unless ``reuse``."""
    return min(common_prefix(cached, prompt), len(prompt) - 1) if reuse else 0


def trim_cache(lib: Any, memory: Any, seq_id: int, cached: list[int], keep: int,
               positions: CachePositions) -> int:
    """Keep the first ``keep`` tokens of sequence ``seq_id``'s cache and drop the rest (``cached``, the
    list of what it holds, and ``positions``, where they sit, are cut to match; never inside an M-RoPE
    media chunk). A cache that cannot drop a tail (a recurrent state) is emptied instead. Returns how
    many tokens were kept."""
    if keep < len(cached):
        keep, position = positions.cut(keep)
        if not lib.llama_memory_seq_rm(memory, seq_id, position, -1):
            lib.llama_memory_seq_rm(memory, seq_id, -1, -1)
            keep = 0
            positions.clear()
        del cached[keep:]
    return keep


def check_count(name: str, value: Any, high: int, *, allow_none: bool = True, low: int = 1) -> None:
    """``value`` must be an integer from ``low`` to ``high`` (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidConfigError(f"{name} must be an integer from {low} to {high}, not {value!r}.")


def check_n_ctx(value: Any, option: str = "n_ctx") -> None:
    """The one rule for a context size asked for (tokens per sequence; None: the default), with one
    message: ``Context(n_ctx=...)``, ``AsyncModel``/``Engine`` and the commands' ``-c/--ctx-size``
    (``option`` names it) all refuse, with InvalidConfigError, what llama.cpp would change: less than
    MIN_CTX (0 and negative numbers included: the message gives the real minimum, not 1)."""
    if isinstance(value, int) and not isinstance(value, bool) and value < MIN_CTX:
        raise InvalidConfigError(f"{option} must be at least {MIN_CTX} tokens, not {value}: llama.cpp makes no "
                                 f"smaller context (it rounds a context up to a multiple of {MIN_CTX}).")
    check_count(option, value, MAX_UINT32, low=MIN_CTX)


@dataclass(frozen=True)
class ContextSettings:
    """What a context is created with; None means the default."""

    n_ctx: int | None = None  # the whole context (all sequences together)
    n_batch: int = DEFAULT_BATCH
    n_threads: int | str | None = None  # "auto": chosen by measuring (mullama.native._compute.ThreadChoice)
    n_threads_batch: int | None = None
    n_seq_max: int = 1
    flash_attn: bool | None = None  # None: upstream's "auto"
    embeddings: bool = False  # an embedding context (see mullama.generate._embed)
    pooling: int = -1  # its llama_pooling_type (-1: the model's)

    def __post_init__(self) -> None:
        check_count("n_ctx", self.n_ctx, MAX_UINT32)
        check_count("n_batch", self.n_batch, MAX_UINT32, allow_none=False)
        if self.n_threads != "auto":
            check_count("n_threads", self.n_threads, MAX_THREADS)
        check_count("n_threads_batch", self.n_threads_batch, MAX_THREADS)
        check_count("parallel", self.n_seq_max, MAX_SEQUENCES, allow_none=False)
        if self.flash_attn is not None and not isinstance(self.flash_attn, bool):
            raise InvalidConfigError(f"flash_attn must be True, False or None, not {self.flash_attn!r}.")

    @property
    def threads(self) -> int:
        return self.n_threads if isinstance(self.n_threads, int) else default_threads()

    @property
    def threads_batch(self) -> int:
        return self.n_threads_batch or self.threads


def kv_cache_bytes(model: Model, n_ctx: int) -> int:
    """About how much memory the KV cache of ``n_ctx`` tokens takes (f16 keys and values in every
    layer; an upper bound for models with sliding-window layers, 0 for recurrent ones)."""
    lib, ptr = model._library.lib, model.ptr
    if lib.llama_model_is_recurrent(ptr):
        return 0
    n_head = max(1, lib.llama_model_n_head(ptr))
    n_head_kv = max(1, lib.llama_model_n_head_kv(ptr))
    head = lib.llama_model_n_embd(ptr) // n_head
    key_length = _arch_int(model, "attention.key_length") or head
    value_length = _arch_int(model, "attention.value_length") or head
    return cast("int", n_ctx * lib.llama_model_n_layer(ptr) * n_head_kv * (key_length + value_length) * 2)


def _arch_int(model: Model, key: str) -> int:
    """The integer metadata value ``<architecture>.<key>``, or 0 when absent."""
    text = model._arch_meta(key) or ""
    return int(text) if text.isdigit() else 0


def available_memory() -> int | None:
    """Bytes of memory this process could still get (MemAvailable and free swap, within a cgroup
    limit), or None where that cannot be read."""
    try:  # (read_text closes each file: no ResourceWarning)
        lines = Path("/proc/meminfo").read_text().splitlines()
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines
                if line.split()[1:2] and line.split()[1].isdigit()}
    except OSError:
        return None
    if "MemAvailable" not in info:
        return None
    available = info["MemAvailable"] + info.get("SwapFree", 0)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit.isdigit():
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def check_memory(model: Model, n_ctx: int) -> None:
    """Refuse at once a context whose KV cache cannot fit in the memory left (llama.cpp would
    allocate for seconds first, then fail or push the machine into swap)."""
    needed = kv_cache_bytes(model, n_ctx)
    available = available_memory()
    if available is not None and needed > available:
        raise ContextError(f"a context of {n_ctx} tokens needs about {needed / 2**30:.1f} GiB for its KV cache, "
                           f"but only {max(available, 0) / 2**30:.1f} GiB of memory is available; "
                           "use a smaller n_ctx (or fewer parallel sequences).")


def create_context(model: Model, settings: ContextSettings) -> Any:
    """A new ``llama_context *`` for ``model`` (the caller owns it); ContextError if llama.cpp refuses."""
    library = model._library
    ffi, lib = library.ffi, library.lib
    if not settings.embeddings and not model.generative:
        raise InvalidConfigError(f"{model.path.name} is an embedding model ({model.pooling} pooling): it cannot "
                                 "generate text. Use model.embed(texts), or load a chat model to generate.")
    params = lib.llama_context_default_params()
    params.n_ctx = settings.n_ctx or default_n_ctx(model) * settings.n_seq_max
    check_memory(model, params.n_ctx)
    params.n_batch = min(settings.n_batch, params.n_ctx)
    params.n_ubatch = min(DEFAULT_UBATCH, params.n_batch)
    if settings.n_seq_max > params.n_batch:  # llama.cpp asserts (aborting the process) on the first decode
        raise InvalidConfigError(f"{settings.n_seq_max} parallel sequences need a batch of at least as many tokens, "
                                 f"but n_batch is {params.n_batch}; raise n_batch (and n_ctx) or use fewer.")
    params.n_seq_max = settings.n_seq_max
    params.n_threads = settings.threads
    params.n_threads_batch = settings.threads_batch
    params.no_perf = False
    params.swa_full = False
    # One KV stream per sequence (llama-server's choice with an explicit --parallel): a sequence's
    # attention never sees another's cells, so batching leaves greedy output unchanged.
    params.kv_unified = False
    if settings.embeddings:
        # Pooled embeddings need a text's tokens in one micro-batch; texts share one cache (any
        # text may use all of it), cleared before each batch.
        params.embeddings = True
        params.pooling_type = settings.pooling
        params.n_ubatch = params.n_batch
        params.kv_unified = True
    if settings.flash_attn is not None:  # upstream's default is "auto"; keep it unless asked
        params.flash_attn_type = (lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn
                                  else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    ptr = lib.llama_init_from_model(model.ptr, params)
    if ptr == ffi.NULL:
        what = f"{params.n_ctx} tokens" + (f" for {settings.n_seq_max} sequences" if settings.n_seq_max > 1 else "")
        raise ContextError(f"llama.cpp could not create a context of {what}; use a smaller n_ctx (memory), "
                           "or enable logging for 'mullama.llama_cpp' to see llama.cpp's reason.")
    return ptr


def warm_up(model: Model, ptr: Any) -> None:
    """One empty run, as upstream's tools do at start: weights and buffers are touched now,
    not during the first request. The cache is cleared afterwards."""
    library = model._library
    ffi, lib = library.ffi, library.lib
    tokens = [t for t in (model.bos_token_id, model.eos_token_id) if t >= 0] or [0]
    array = ffi.new("llama_token[]", tokens)
    lib.llama_set_warmup(ptr, True)
    with library.compute.lock_for(model.offloaded):
        lib.llama_decode(ptr, lib.llama_batch_get_one(array, len(tokens)))
    lib.llama_memory_clear(lib.llama_get_memory(ptr), True)
    lib.llama_synchronize(ptr)
    lib.llama_perf_context_reset(ptr)
    lib.llama_set_warmup(ptr, False)


def adopt_context(owner: Owned, model: Model, ptr: Any, settings: ContextSettings, *,
                  warmup: bool) -> Callable[[float, int], None] | None:
    """Make ``owner`` own the llama context ``ptr``: computing on the shared thread pools,
    warmed up, freed before its model, registered with its model. Returns where the times of its
    token steps go (``Compute.record``) when its thread count is chosen by measuring, else None."""
    library = model._library
    lib = library.lib
    try:
        adaptive = settings.n_threads == "auto" and settings.n_threads_batch is None and not model.offloaded
        library.compute.attach(ptr, settings.threads, settings.threads_batch, adaptive=adaptive)
        if warmup:
            warm_up(model, ptr)
        model._relays.check(lib, ptr)  # its KV cache (and warm-up) on an RPC server that was lost: RpcServerLostError
    except BaseException:
        library.compute.detach(ptr)
        lib.llama_free(ptr)
        raise

    def free(context_ptr: Any, _model: Any = model.ptr) -> None:
        # The default argument holds the model's pointer object, so the model is freed after us.
        library.compute.detach(context_ptr)
        lib.llama_free(context_ptr)

    owner._own(library.ffi, ptr, free)
    model._register(owner)
    return library.compute.record if adaptive else None
