"""LoRA adapters: loaded once per model (``llama_adapter_lora_init``), applied per context and per batch
(``llama_set_adapters_lora``).

A :class:`LoraAdapter` belongs to its :class:`~mullama.generate._model.Model`: the model frees its
adapters (``llama_adapter_lora_free``) before its weights in ``close()``, and llama.cpp's model
destructor frees any still attached when a model is garbage-collected instead, so each is freed exactly
once and none outlives the weights it patches. ``model.lora`` lists the adapters in load order (their
index is llama-server's adapter ``id``), each with its default ``scale``.

An adapter set is a tuple of ``(adapter, scale)`` pairs with non-zero scales, in id order: what
llama.cpp applies (it ignores zero scales), and the key under which sequences may share a decode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .._exceptions import ClosedError, InvalidConfigError, LoraLoadError
from ..native import _library
from ..native._owned import freed_count, owned_count

if TYPE_CHECKING:
    from ._model import Model

__all__ = ["LoraAdapter", "LoraSet", "LoraSpec", "apply_lora", "batch_lora", "free_adapters", "load_adapter",
           "lora_set"]

GGUF_MAGIC = b"GGUF"

# {path | adapter | id: scale}, or [(path | adapter | id, scale) | path | adapter, ...] (a bare one: scale 1.0)
LoraSpec = Mapping[Any, float] | Iterable[Any]
LoraSet = tuple[tuple["LoraAdapter", float], ...]


class LoraAdapter:
    """A LoRA adapter loaded for one model: ``path``, ``id`` (its index in ``model.lora``), ``scale``
    (the default scale contexts and requests use when they name none) and ``metadata``."""

    _kind = "lora"

    def __init__(self, model: Model, ptr: Any, path: Path, adapter_id: int, scale: float) -> None:
        self.model = model
        self._ptr = ptr
        self.path = path
        self.id = adapter_id
        self.scale = scale
        owned_count[self._kind] += 1

    @property
    def ptr(self) -> Any:
        if self._ptr is None:
            raise ClosedError(f"the LoRA adapter {self.path.name} was freed with its model.")
        return self._ptr

    @property
    def closed(self) -> bool:
        return self._ptr is None

    @property
    def metadata(self) -> dict[str, str]:
        """The adapter GGUF's scalar key/values (``adapter.lora.alpha``, ``general.name``, ...)."""
        ffi, lib = self.model._ffi, self.model._library.lib
        ptr = self.ptr
        buf = ffi.new("char[]", 4096)
        result = {}
        for index in range(lib.llama_adapter_meta_count(ptr)):
            lib.llama_adapter_meta_key_by_index(ptr, index, buf, 4096)
            key = ffi.string(buf).decode("utf-8", "replace")
            lib.llama_adapter_meta_val_str_by_index(ptr, index, buf, 4096)
            result[key] = ffi.string(buf).decode("utf-8", "replace")
        return result

    def _free(self, lib: Any) -> None:
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            lib.llama_adapter_lora_free(ptr)
            freed_count[self._kind] += 1

    def __repr__(self) -> str:
        return f"<mullama.LoraAdapter {self.id} {self.path.name} scale={self.scale}>"


def _check_scale(scale: Any, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale or abs(scale) > 1e6:
        raise InvalidConfigError(f"the scale of LoRA adapter {what} must be a finite number, not {scale!r}.")
    return float(scale)


def load_adapter(model: Model, path: str | os.PathLike[str], scale: float = 1.0) -> LoraAdapter:
    """Load ``path`` for ``model`` (once: a path loaded before gives the same adapter, its scale kept).
    Raises LoraLoadError (LORA_LOAD_ERROR, a ModelLoadError) with llama.cpp's reason for a missing, corrupt or
    mismatched adapter file, InvalidConfigError for a bad scale."""
    scale = _check_scale(scale, os.fspath(path))
    resolved = Path(os.fspath(path)).expanduser()
    try:
        resolved = resolved.resolve()
        with open(resolved, "rb") as handle:
            magic = handle.read(4)
    except (OSError, ValueError) as exc:
        raise LoraLoadError(f"cannot read the LoRA adapter {os.fspath(path)!r}: "
                             f"{getattr(exc, 'strerror', None) or exc}.") from None
    if magic != GGUF_MAGIC:
        raise LoraLoadError(f"{resolved} is not a GGUF file: a LoRA adapter is a GGUF written by llama.cpp's "
                             "convert_lora_to_gguf.py.")
    with model._lock:
        model.ensure_open()
        for adapter in model.lora:
            if adapter.path == resolved:
                return adapter
        lib, ffi = model._library.lib, model._ffi
        # Under the compute lock: the adapter joins the model's set, which a context's graph reserve reads.
        with model._library.compute.lock, _library.capture_output(lambda text: ("", text)) as said:
            ptr = lib.llama_adapter_lora_init(model._ptr, os.fsencode(resolved))
        if ptr == ffi.NULL:
            reason = next((line.split(": ", 1)[-1] for line in reversed(said.log) if "lora" in line.lower()),
                          "see the 'mullama.llama_cpp' log")
            raise LoraLoadError(f"llama.cpp could not load the LoRA adapter {resolved} for {model.path.name}: "
                                 f"{reason}. The adapter must be made for this model (same architecture "
                                 "and tensor shapes).")
        adapter = LoraAdapter(model, ptr, resolved, len(model.lora), scale)
        model.lora.append(adapter)
        return adapter


def free_adapters(model: Model) -> None:
    """Free ``model``'s adapters (its close(), before the weights); they are unusable afterwards."""
    lib = model._library.lib
    for adapter in model.lora:
        adapter._free(lib)


def _entries(spec: Any) -> list[tuple[Any, Any]]:
    if isinstance(spec, Mapping):
        return list(spec.items())
    if isinstance(spec, (str, os.PathLike, LoraAdapter, int)):
        spec = [spec]
    try:
        items = list(spec)
    except TypeError:
        raise InvalidConfigError(f"lora must be a mapping {{path: scale}} or a list of paths or (path, scale) "
                                 f"pairs, not {type(spec).__name__}.") from None
    return [tuple(item) if isinstance(item, (tuple, list)) and len(item) == 2 else (item, 1.0)
            for item in items]


def _adapter(model: Model, key: Any) -> LoraAdapter:
    if isinstance(key, LoraAdapter):
        if key.model is not model:
            raise InvalidConfigError(f"the LoRA adapter {key.path.name} was loaded for another model.")
        return key
    if isinstance(key, int) and not isinstance(key, bool):
        if not 0 <= key < len(model.lora):
            raise InvalidConfigError(f"LoRA adapter id {key} does not exist (this model has {len(model.lora)}).")
        return model.lora[key]
    if isinstance(key, (str, os.PathLike)):
        return load_adapter(model, key, 0.0)  # loaded on first use; its default scale (for others) stays 0
    raise InvalidConfigError(f"a LoRA adapter is named by a path, an id or a LoraAdapter, not {key!r}.")


def lora_set(model: Model, spec: LoraSpec | None) -> LoraSet:
    """The adapter set ``spec`` names: its adapters with their scales, every other one at 0 (as
    llama-server's per-request ``lora``). None: the model's adapters at their default scales."""
    if spec is None:
        scales = {adapter.id: adapter.scale for adapter in model.lora}
    else:
        scales = {}
        for key, scale in _entries(spec):
            adapter = _adapter(model, key)
            scales[adapter.id] = _check_scale(scale, str(adapter.path))
    return tuple((model.lora[i], scale) for i, scale in sorted(scales.items()) if scale != 0.0)


def apply_lora(model: Model, ctx: Any, adapters: LoraSet) -> None:
    """Make ``adapters`` the ones llama.cpp applies in the context ``ctx`` (a no-op when they already are)."""
    ffi, lib = model._ffi, model._library.lib
    if adapters:
        ptrs = ffi.new("struct llama_adapter_lora *[]", [adapter.ptr for adapter, _ in adapters])
        scales = ffi.new("float[]", [scale for _, scale in adapters])
    else:
        ptrs, scales = ffi.NULL, ffi.NULL
    rc = lib.llama_set_adapters_lora(ctx, ptrs, len(adapters), scales)
    if rc != 0:
        raise InvalidConfigError(f"llama.cpp refused the LoRA adapters ({rc}).")


def batch_lora(slots: Sequence[Any], turn: int, current: LoraSet) -> tuple[LoraSet, int]:
    """The adapter set of the engine's next batch (llama.cpp applies one set per decode, as llama-server
    batches only slots with equal adapters), and the next ``turn``: the set of the first slot with work
    (a prompt to decode, or a token to decode that its reader has room for), looking from ``turn``, so
    that sequences with different sets take turns step by step; the others wait for a later step.
    ``current`` (the set applied) when no slot has work."""
    count = len(slots)
    for i in range(count):
        slot = slots[(turn + i) % count]
        request = slot.request
        if request is not None and not request.cancelled and (slot.pending_prompt or (slot.next_token is not None
                                                            and request.channel.has_room())):
            return slot.lora, (turn + i + 1) % count
    return current, turn


def describe(adapters: LoraSet) -> list[tuple[str, float]]:
    """``[(path, scale), ...]`` of a set, for a repr or a log line."""
    return [(str(adapter.path), cast("float", scale)) for adapter, scale in adapters]
