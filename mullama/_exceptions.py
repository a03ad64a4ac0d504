"""Every error mullama raises on purpose.

    MullamaError                      .code, a stable string for programs
     ├── LibraryError                 LIBRARY_ERROR      libllama missing or not the pinned build
     ├── ModelLoadError               MODEL_LOAD_ERROR   a model file that cannot be loaded
     ├── ModelNotFoundError           MODEL_NOT_FOUND    a model name the registry does not know
     ├── DownloadError                DOWNLOAD_ERROR     a download that failed or did not verify
     ├── InvalidConfigError           INVALID_CONFIG     a parameter out of range (also ValueError)
     ├── ContextError                 CONTEXT_ERROR      a context that cannot be created or used
     │    └── ContextOverflowError    CONTEXT_OVERFLOW   a prompt that does not fit in the context
     ├── TokenizeError                TOKENIZE_ERROR     text that cannot be tokenised
     ├── TemplateError                TEMPLATE_ERROR     a chat template that fails to render
     ├── StreamingError               GENERATION_ERROR or STREAM_TIMEOUT
     └── ClosedError                  CLOSED             use of a model or context after close()

Each message says what happened and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "ClosedError",
    "ContextError",
    "ContextOverflowError",
    "DownloadError",
    "InvalidConfigError",
    "LibraryError",
    "ModelLoadError",
    "ModelNotFoundError",
    "MullamaError",
    "StreamingError",
    "TemplateError",
    "TokenizeError",
]


class MullamaError(Exception):
    """Base class of mullama's errors; ``code`` is stable across releases."""

    code: str = "MULLAMA_ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class LibraryError(MullamaError):
    code = "LIBRARY_ERROR"


class ModelLoadError(MullamaError):
    code = "MODEL_LOAD_ERROR"


class ModelNotFoundError(MullamaError):
    code = "MODEL_NOT_FOUND"


class DownloadError(MullamaError):
    code = "DOWNLOAD_ERROR"


class InvalidConfigError(MullamaError, ValueError):
    code = "INVALID_CONFIG"


class ContextError(MullamaError):
    code = "CONTEXT_ERROR"


class ContextOverflowError(ContextError):
    code = "CONTEXT_OVERFLOW"


class TokenizeError(MullamaError):
    code = "TOKENIZE_ERROR"


class TemplateError(MullamaError):
    code = "TEMPLATE_ERROR"


class StreamingError(MullamaError):
    """Generation failed (``GENERATION_ERROR``) or ran past its time (``STREAM_TIMEOUT``)."""

    code = "GENERATION_ERROR"


class ClosedError(MullamaError):
    code = "CLOSED"
