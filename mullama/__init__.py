"""mullama: stream tokens from local GGUF models through llama.cpp.

    from mullama import Model, Context
    model = Model.load("smollm2:135m")      # a .gguf path, or a model name (downloaded once)
    context = Context(model)
    print(context.generate("The capital of France is", max_tokens=16).text)

Importing this package loads no native code: libllama is found and loaded on
first use (see ``mullama.system_info()``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _exceptions
from ._exceptions import (
    ClosedError,
    ContextError,
    ContextOverflowError,
    DownloadError,
    EngineError,
    InvalidConfigError,
    LibraryError,
    LoraLoadError,
    MediaError,
    MediaNotSupportedError,
    MediaTooLargeError,
    ModelLoadError,
    ModelNotFoundError,
    MullamaError,
    NotAStateFileError,
    QueueFullError,
    RemoteMediaRefusedError,
    RequestCancelledError,
    RpcServerLostError,
    StateCorruptError,
    StateError,
    StateModelMismatchError,
    StreamingError,
    StreamTimeoutError,
    TemplateError,
    TokenizeError,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncModel",
    "AsyncTokenStream",
    "ClosedError",
    "Completion",
    "Context",
    "ContextError",
    "ContextOverflowError",
    "DownloadError",
    "EngineError",
    "InvalidConfigError",
    "LibraryError",
    "LoraLoadError",
    "MediaError",
    "MediaNotSupportedError",
    "MediaTooLargeError",
    "Model",
    "ModelLoadError",
    "ModelNotFoundError",
    "MullamaError",
    "NotAStateFileError",
    "QueueFullError",
    "RemoteMediaRefusedError",
    "RequestCancelledError",
    "RpcServerLostError",
    "SamplerChain",
    "StateCorruptError",
    "StateError",
    "StateModelMismatchError",
    "StreamConfig",
    "StreamTimeoutError",
    "StreamingError",
    "TemplateError",
    "Token",
    "TokenStream",
    "TokenizeError",
    "ToolCall",
    "system_info",
]

# Public name -> the private module that defines it; imported on first access to keep
# `import mullama` light (no cffi, no dlopen).
_LAZY = {
    "AsyncModel": ".generate._async",
    "AsyncTokenStream": ".generate._async",
    "StreamConfig": ".generate._config",
    "Token": ".generate._sequence",
    "TokenStream": ".generate._stream",
    "Model": ".generate._model",
    "Context": ".generate._context",
    "Completion": ".generate._completion",
    "SamplerChain": ".generate._sampler",
    "ToolCall": ".chat._tools",
    "system_info": ".native._library",
}

if TYPE_CHECKING:
    from .chat._tools import ToolCall
    from .generate._async import AsyncModel, AsyncTokenStream
    from .generate._completion import Completion
    from .generate._config import StreamConfig
    from .generate._context import Context
    from .generate._model import Model
    from .generate._sampler import SamplerChain
    from .generate._sequence import Token
    from .generate._stream import TokenStream
    from .native._library import system_info


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mullama' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


for _name in _exceptions.__all__:  # every error class is mullama.Name, as it is imported
    if isinstance(globals().get(_name), type):
        globals()[_name].__module__ = "mullama"
del _name
