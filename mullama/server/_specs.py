"""The models a server may answer with (``ModelSpec``, from ``--models`` and ``--models-dir``), and how
each is loaded and given an engine (``LoadOptions``, ``load_model``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._exceptions import InvalidConfigError, ModelNotFoundError
from ..generate._engine import Engine
from ..generate._model import Model
from ..generate._prompt_cache import DEFAULT_CACHE_RAM_MIB

__all__ = ["LoadOptions", "ModelSpec", "load_model", "model_specs"]


@dataclass(frozen=True)
class ModelSpec:
    """A model the server may answer with: its listed ``name``, other names that pick it, and what
    ``Model.load`` gets (a hub name or a path — never one a request gave)."""

    name: str
    ref: str
    aliases: tuple[str, ...] = ()

    def path(self) -> Path | None:
        """Its file, when it is on disk (a local file, or a hub model already downloaded)."""
        from ..hub._cache import cached
        from ..hub._catalog import is_local_path

        if is_local_path(self.ref):
            return Path(self.ref).expanduser()
        try:
            return cached(self.ref)
        except ModelNotFoundError:
            return None

    def projector(self) -> Path | None:
        """The multimodal projector pulled with it (a Hugging Face model already downloaded), if any."""
        from ..hub._cache import projector_of
        from ..hub._catalog import is_local_path

        path = None if is_local_path(self.ref) else self.path()
        projector = projector_of(path) if path is not None else None
        return projector.path if projector is not None and projector.complete else None


def model_specs(refs: Sequence[str], models_dir: str | os.PathLike | None = None) -> list[ModelSpec]:
    """The specs for ``--models`` (hub names, tagless family names, paths) and every ``.gguf`` file
    in ``--models-dir``. A hub model is named by its full name (``smollm2:135m``) and also answers to
    the name given and its family (``smollm2``); a file by its stem. Problems fail here, at start."""
    from ..hub._catalog import entry_for, is_family, is_local_path

    specs: list[ModelSpec] = []
    for ref in refs:
        if is_local_path(ref):
            path = Path(ref).expanduser()
            if not path.is_file():
                raise ModelNotFoundError(f"--models names {ref}, which is not a file.")
            specs.append(ModelSpec(path.stem, str(path.resolve())))
            continue
        entry = entry_for(ref)  # MODEL_NOT_FOUND for an unknown name
        family = entry.name.split(":")[0]
        aliases = {ref, family} if is_family(family) else {ref}
        specs.append(ModelSpec(entry.name, entry.name, tuple(sorted(aliases - {entry.name}))))
    if models_dir is not None:
        directory = Path(models_dir).expanduser()
        if not directory.is_dir():
            raise ModelNotFoundError(f"--models-dir {models_dir} is not a directory.")
        files = sorted(directory.glob("*.gguf"))
        if not files:
            raise ModelNotFoundError(f"--models-dir {models_dir} holds no .gguf file.")
        specs += [ModelSpec(path.stem, str(path.resolve())) for path in files]
    names = [name for spec in specs for name in (spec.name, *spec.aliases)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidConfigError(f"two models answer to {repeated[0]!r}; give each model once (rename a file "
                                 "whose stem repeats another's name).")
    if not specs:
        raise InvalidConfigError("no model to serve: give a model, --models or --models-dir.")
    return specs


@dataclass
class LoadOptions:
    """How each served model is loaded and given an engine."""

    parallel: int = 4
    ctx_size: int | None = None
    threads: int | str | None = None  # "auto": measured (see ContextSettings)
    flash_attn: bool | None = None  # -fa on|off|auto (None)
    max_queue: int = 64
    cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB
    pooling: str | None = None
    chat_template: str | None = None
    placement: dict[str, Any] = field(default_factory=dict)  # Model.load's offloading options (-ngl, --rpc)
    lora: tuple[tuple[str, float], ...] = ()  # --lora / --lora-scaled: (path, scale), in id order
    lora_init_without_apply: bool = False  # load them at scale 0 (POST /lora-adapters sets scales later)
    speculative: dict[str, Any] | None = None  # --spec-type and sizes: StreamConfig fields every request gets
    draft_model: str | None = None  # -md: a draft model's path (each engine loads its own)
    # --mmproj: the multimodal projector (images in); None: the one pulled with each model; False: none
    mmproj: str | Literal[False] | None = None


def load_model(spec: ModelSpec, options: LoadOptions) -> tuple[Model, Engine | None]:
    """Load ``spec`` and start its engine (none for an embedding model, which only embeds)."""
    from ..generate._embed import resolve_pooling

    lora = [(path, 0.0 if options.lora_init_without_apply else scale) for path, scale in options.lora]
    model = Model.load(spec.ref, chat_template=options.chat_template, lora=lora or None, mmproj=options.mmproj,
                       **options.placement)
    try:
        if options.ctx_size is not None and options.ctx_size > model.n_ctx_train:
            print(f"mullama: warning: --ctx-size {options.ctx_size} is beyond the {model.n_ctx_train} tokens "
                  f"{spec.name} was trained with; replies may degrade past that point.", file=sys.stderr)
        resolve_pooling(model, options.pooling)
        engine = None
        if model.generative:
            engine = Engine(model, parallel=options.parallel, n_ctx=options.ctx_size, n_threads=options.threads,
                            flash_attn=options.flash_attn, max_queue=options.max_queue,
                            cache_ram_mib=options.cache_ram_mib, speculative=options.speculative,
                            draft_model=options.draft_model)
    except BaseException:
        model.close()
        raise
    return model, engine
