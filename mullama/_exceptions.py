"""Every error mullama raises on purpose.

    MullamaError                      .code, a stable string for programs
     ├── LibraryError                 LIBRARY_ERROR      libllama missing or not the pinned build
     ├── ModelLoadError               MODEL_LOAD_ERROR   a model file that cannot be loaded
     │    └── LoraLoadError           LORA_LOAD_ERROR    a LoRA adapter file llama.cpp refuses
     ├── ModelNotFoundError           MODEL_NOT_FOUND    a model name the registry does not know
     ├── DownloadError                DOWNLOAD_ERROR     a download that failed or did not verify
     ├── InvalidConfigError           INVALID_CONFIG     a parameter out of range (also ValueError)
     ├── ContextError                 CONTEXT_ERROR      a context that cannot be created or used
     │    └── ContextOverflowError    CONTEXT_OVERFLOW   a prompt that does not fit in the context
     ├── TokenizeError                TOKENIZE_ERROR     text that cannot be tokenised
     ├── TemplateError                TEMPLATE_ERROR     a chat template that fails to render
     ├── StreamingError               GENERATION_ERROR   generation failed (llama_decode, a stream)
     │    ├── StreamTimeoutError      STREAM_TIMEOUT     generation ran past its timeout_ms
     │    └── EngineError             ENGINE_FAILED      the batching engine stopped; restart it
     ├── QueueFullError               QUEUE_FULL         every slot busy and the waiting queue full
     ├── StateError                   STATE_ERROR        a saved KV state that cannot be loaded here
     │    ├── NotAStateFileError      NOT_A_STATE_FILE   the bytes are not a mullama state at all
     │    ├── StateCorruptError       STATE_CORRUPT      a state file truncated or damaged
     │    └── StateModelMismatchError STATE_MODEL_MISMATCH  saved by another model
     ├── RpcServerLostError           RPC_SERVER_LOST    an RPC server of the model went away; load it again
     ├── MediaError                   INVALID_MEDIA      an image or audio input that cannot be used (also
     │    │                                              ValueError): unreadable, corrupt, of an unknown kind
     │    ├── MediaTooLargeError      MEDIA_TOO_LARGE    beyond a limit (bytes, pixels, seconds of audio)
     │    ├── MediaNotSupportedError  MEDIA_NOT_SUPPORTED  the model has no projector for it
     │    └── RemoteMediaRefusedError REMOTE_MEDIA_REFUSED  an http(s) URL, not allowed here
     ├── RequestCancelledError        CANCELLED          work whose caller stopped waiting for it
     └── ClosedError                  CLOSED             use of a model or context after close()

Each class has its own code, fixed (no instance changes it): catching a class catches its subclasses'
codes too (``except MediaError`` catches MEDIA_TOO_LARGE).

Each message says what happened and what to do about it.
"""

from __future__ import annotations

import copy

__all__ = [
    "ClosedError",
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
    "ModelLoadError",
    "ModelNotFoundError",
    "MullamaError",
    "NotAStateFileError",
    "QueueFullError",
    "RemoteMediaRefusedError",
    "RequestCancelledError",
    "RpcServerLostError",
    "StateCorruptError",
    "StateError",
    "StateModelMismatchError",
    "StreamTimeoutError",
    "StreamingError",
    "TemplateError",
    "TokenizeError",
    "decode_error",
    "detached",
]


class MullamaError(Exception):
    """Base class of mullama's errors; ``code`` is stable across releases."""

    code: str = "MULLAMA_ERROR"

    @property
    def message(self) -> str:
        return str(self)


class LibraryError(MullamaError):
    code = "LIBRARY_ERROR"


class ModelLoadError(MullamaError):
    code = "MODEL_LOAD_ERROR"


class LoraLoadError(ModelLoadError):
    """A LoRA adapter GGUF that llama.cpp refuses (missing, not an adapter, made for another model)."""

    code = "LORA_LOAD_ERROR"


class ModelNotFoundError(MullamaError):
    code = "MODEL_NOT_FOUND"


class DownloadError(MullamaError):
    code = "DOWNLOAD_ERROR"


class InvalidConfigError(MullamaError, ValueError):
    """A setting out of its range or of the wrong type. ``field`` names the StreamConfig field at
    fault when there is one (None otherwise), so that a server can name its request's own field."""

    code = "INVALID_CONFIG"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ContextError(MullamaError):
    code = "CONTEXT_ERROR"


class ContextOverflowError(ContextError):
    code = "CONTEXT_OVERFLOW"


class TokenizeError(MullamaError):
    code = "TOKENIZE_ERROR"


class TemplateError(MullamaError):
    code = "TEMPLATE_ERROR"


class StreamingError(MullamaError):
    """Generation failed (``GENERATION_ERROR``); its subclasses say more."""

    code = "GENERATION_ERROR"


class StreamTimeoutError(StreamingError):
    """Generation ran past ``StreamConfig.timeout_ms``."""

    code = "STREAM_TIMEOUT"


class EngineError(StreamingError):
    """The batching engine's thread stopped: every request it held failed, new ones are refused."""

    code = "ENGINE_FAILED"


class QueueFullError(MullamaError):
    """Every slot of the engine is busy and its waiting queue is full."""

    code = "QUEUE_FULL"


class StateError(MullamaError):
    """A saved KV state (``Context.save_state``, a server's slot file) that cannot be loaded here."""

    code = "STATE_ERROR"


class NotAStateFileError(StateError):
    code = "NOT_A_STATE_FILE"


class StateCorruptError(StateError):
    code = "STATE_CORRUPT"


class StateModelMismatchError(StateError):
    code = "STATE_MODEL_MISMATCH"


class RpcServerLostError(MullamaError):
    """An RPC server holding layers of the model went away (killed, restarted, the network lost). The
    model cannot compute any more: restart the server, then load the model again. Raised by the decode
    that noticed, by every later one, and by a ``Model.load`` during which the server went away."""

    code = "RPC_SERVER_LOST"


class MediaError(MullamaError, ValueError):
    """An image or audio input that cannot be used (INVALID_MEDIA: unreadable, corrupt, of an unknown
    kind); its subclasses say more: MediaTooLargeError, MediaNotSupportedError, RemoteMediaRefusedError."""

    code = "INVALID_MEDIA"


class MediaTooLargeError(MediaError):
    """An image or clip beyond a limit: its encoded bytes, its pixels, or its seconds of audio."""

    code = "MEDIA_TOO_LARGE"


class MediaNotSupportedError(MediaError):
    """An image or audio part for a model without a projector that takes it."""

    code = "MEDIA_NOT_SUPPORTED"


class RemoteMediaRefusedError(MediaError):
    """An http(s) URL where only inline data (or allowed files) may be given."""

    code = "REMOTE_MEDIA_REFUSED"


class RequestCancelledError(MullamaError):
    """Work (an embedding) given up because its caller stopped waiting for it; rarely seen, since the
    caller has gone."""

    code = "CANCELLED"


class ClosedError(MullamaError):
    code = "CLOSED"


# llama_decode's return codes (llama.h): 0 ok, 1 no KV slot for the batch, 2 aborted, -1 bad batch,
# < -1 a failure inside the computation.
DECODE_OK, DECODE_NO_SLOT, DECODE_ABORTED = 0, 1, 2


def decode_error(rc: int, *, n_ctx: int, processed: int = 0) -> MullamaError:
    """The exception for a failed ``llama_decode`` (``rc`` != 0) of a sequence in a context of
    ``n_ctx`` tokens, after ``processed`` generated tokens (0 while decoding the prompt)."""
    if rc == DECODE_ABORTED:
        where = "while processing the prompt" if not processed else f"after {processed} tokens"
        return StreamTimeoutError(f"generation timed out {where}; raise timeout_ms, or shorten the prompt.")
    if rc == DECODE_NO_SLOT:
        return ContextOverflowError(f"the KV cache is full ({n_ctx} tokens); clear() the context, shorten the "
                                    "prompt, or use a larger n_ctx.")
    if rc == -1:
        return StreamingError("llama_decode refused the batch (code -1: a token or position out of range); "
                              "this is a bug in mullama, please report it.")
    return StreamingError(f"llama_decode failed with code {rc}; enable logging for 'mullama.llama_cpp' "
                          "to see llama.cpp's reason.")


def detached(error: BaseException) -> BaseException:
    """A copy of ``error`` (its type, message and attributes) without a traceback: the one to keep, or
    to hand to another thread.

    A raised exception holds in its traceback every frame it passed through, and those frames hold
    their objects (a Context, an engine, the AsyncModel in a caller's frame). Kept where those frames
    can reach it (a stream's sequence, a channel), it makes a reference cycle that only the cyclic GC
    frees, and the objects in it (an engine's thread) live on until then. The original is returned
    for an exception type that cannot be copied.
    """
    try:
        return copy.copy(error).with_traceback(None)
    except Exception:  # noqa: BLE001 (copying runs the type's own code; any failure: keep the original)
        return error
