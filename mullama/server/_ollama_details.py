"""What ollama's listings say of a served model (``/api/tags``, ``/api/show``, ``/api/ps``): read from
its GGUF header, and from its projector's when one goes with it (``--mmproj``, or pulled with the model)."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from .._exceptions import InvalidConfigError
from ..chat._reasoning import thinks
from ..chat._tools import calls_tools
from ..generate._infill import fim_tokens
from ._pool import ModelPool, Served
from ._specs import ModelSpec

__all__ = ["capabilities", "chat_template", "describe", "fills_in", "listing", "model_projector", "running"]

@functools.lru_cache(maxsize=64)
def _file_details(path: str, mtime: float) -> dict:
    """What ollama's listings say of a model file (read from its GGUF header; cached per file version)."""
    from ..gguf._reader import read_gguf_info

    info = read_gguf_info(path)
    metadata = {key: value for key, value in info.metadata.items() if not isinstance(value, list)}
    return {"size": Path(path).stat().st_size,
            "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime)),
            "details": {"parent_model": "", "format": "gguf", "family": info.architecture,
                        "families": [info.architecture], "parameter_size": f"{info.n_params / 1e6:.0f}M",
                        "quantization_level": info.quantization},
            "template": info.chat_template or "", "model_info": metadata,
            "embedding": f"{info.architecture}.pooling_type" in info.metadata}


@functools.lru_cache(maxsize=64)
def _projector_details(path: str, mtime: float) -> dict:
    """What a projector's GGUF header says: ollama's ``projector_info``, and whether it takes images, audio."""
    from ..gguf._reader import read_gguf_info

    metadata = {key: value for key, value in read_gguf_info(path).metadata.items() if not isinstance(value, list)}
    return {"projector_info": metadata, "vision": bool(metadata.get("clip.has_vision_encoder")),
            "audio": bool(metadata.get("clip.has_audio_encoder"))}


def model_projector(pool: ModelPool, spec: ModelSpec) -> Path | None:
    """The projector of ``spec``: the loaded model's (--mmproj, or pulled with it), else the one pulled with it."""
    served = pool.served(spec)
    model = served.model if served is not None else None
    if model is not None and model.projector is not None:
        return model.projector.path
    return spec.projector()


def describe(spec: ModelSpec, projector: Path | None = None) -> dict:
    """What ollama says of ``spec``'s file, and of ``projector`` (its families then include ``clip``)."""
    path = spec.path()
    if path is None or not path.is_file():  # a hub model not downloaded yet
        return {"size": 0, "modified_at": "", "details": {"format": "gguf"}, "template": "", "model_info": {},
                "embedding": False}
    found = _file_details(str(path), path.stat().st_mtime)
    if projector is None or not projector.is_file():
        return found
    extra = _projector_details(str(projector), projector.stat().st_mtime)
    return {**found, **extra, "details": {**found["details"], "families": [*found["details"]["families"], "clip"]}}


def chat_template(pool: ModelPool, spec: ModelSpec, described: dict) -> str:
    """The chat template ``spec`` is served with: the loaded model's (``--chat-template-file`` replaces
    the GGUF's), else the one its GGUF header holds (``describe``'s)."""
    served = pool.served(spec)
    model = served.model if served is not None else None
    if model is not None:
        return model.chat_template or ""
    return described["template"]


def fills_in(pool: ModelPool, spec: ModelSpec, described: dict) -> bool:
    """Whether ``spec`` has fill-in-the-middle tokens (``/api/generate``'s ``suffix`` needs them): the
    loaded model's vocabulary says (llama.cpp also finds them by their text), else its GGUF header."""
    served = pool.served(spec)
    if served is not None and served.model is not None:
        try:
            fim_tokens(served.model)
        except InvalidConfigError:
            return False
        return True
    return all(f"tokenizer.ggml.fim_{role}_token_id" in described["model_info"] for role in ("pre", "suf", "mid"))


def capabilities(described: dict, template: str, insert: bool = False) -> list[str]:
    """ollama's capabilities of a model (``describe``'s, served with the chat ``template``): ``embedding``,
    or ``completion``, with ``tools`` when the template lets it call tools and ``thinking`` when it
    writes a thought (the library's own rules, which the chat routes follow: clients switch tool calling
    and thinking on by these), ``insert`` when it fills in the middle (``fills_in``), and ``vision`` (and
    ``audio``) when a projector goes with it."""
    if described["embedding"]:
        return ["embedding"]
    found = {"completion": True, "tools": calls_tools(template), "insert": insert,
             "vision": bool(described.get("vision")), "audio": bool(described.get("audio")),
             "thinking": thinks(template)}  # in ollama's order
    return [name for name, has in found.items() if has]


def listing(pool: ModelPool, spec: ModelSpec, name: str | None = None) -> dict:
    """ollama's listing of ``spec``, under ``name`` (a copy's) or its own."""
    described = describe(spec, model_projector(pool, spec))
    return {"name": name or spec.name, "model": name or spec.name, "size": described["size"], "digest": "",
            "modified_at": described["modified_at"], "details": described["details"]}


def running(pool: ModelPool, served: Served) -> dict:
    expires_in = served.expires_in
    expires_at = "2999-01-01T00:00:00Z" if expires_in is None else time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + expires_in))
    engine = served.engine
    return {**listing(pool, served.spec), "size": served.memory, "size_vram": 0, "expires_at": expires_at,
            "context_length": served.context_length,
            "idle_seconds": round(served.idle_seconds, 1),
            "active_streams": engine.active_streams if engine is not None else 0}
