"""Images and audio in, through libmtmd: a model's projector (its ``mmproj`` GGUF), the media of a
chat read and checked, and a prompt of text and media chunks evaluated into a context.

The prompt is tokenized by ``mtmd_tokenize`` into chunks: text chunks are decoded by the context as
any prompt is; a media chunk is encoded by the projector and its embeddings decoded at their
positions by ``mtmd_helper_eval_chunk_single``, as llama-server evaluates them: with M-RoPE positions
(2-D for an image, ``mtmd_decode_use_mrope``: Qwen2-VL and kin) and with non-causal attention over the
chunk (``mtmd_decode_use_non_causal``: Gemma 3) where the projector asks for them. An M-RoPE chunk takes
fewer positions than tokens: the cache's CachePositions (mullama.generate._positions) records it, and
everything decoded after it sits at the position it names. In the context's list of cached tokens a
media chunk's positions hold a placeholder derived from the media's id (the SHA-256 of its bytes), so
the prompt cache reuses a cached image only for the same image at the same place.

Both a Context (one sequence) and the engine's slots (many) evaluate a prompt through
``MediaPrompt.reusable`` / ``evaluate_head``; the text after the last media is then decoded as any
prompt's, at ``len(cached) + positions.shift``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._exceptions import (
    ContextOverflowError,
    InvalidConfigError,
    MediaError,
    MediaNotSupportedError,
    MediaTooLargeError,
    ModelLoadError,
    RemoteMediaRefusedError,
)
from ..chat._media_parts import MediaSource
from ..native import _library
from ..native._owned import Owned
from ._context_params import default_threads, prompt_breaks, reusable_prefix, trim_cache
from ._media_check import check_media_header
from ._positions import CachePositions

if TYPE_CHECKING:
    from ._model import Model

__all__ = ["MediaLimits", "MediaPrompt", "Projector", "media_bytes"]

# A placeholder token id for every position of a media chunk: negative (never a real token).
_PLACEHOLDER_SPAN = 1 << 40


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on the media a request may carry, and where they may come from (the server sets its own
    from its options: no local files but under its --media-path, no remote URLs unless allowed)."""

    max_bytes: int = 20 << 20  # of one image or clip, encoded
    max_items: int = 8  # per request
    max_pixels: int = 50_000_000  # of one decoded image (declared by its header)
    max_audio_seconds: float = 900.0  # of one clip, declared by its headers (decoded whole into memory)
    allow_remote: bool = False  # http(s) URLs are fetched (with max_bytes and a timeout) only when allowed
    allow_files: bool = True  # file paths and file:// URLs are read
    file_root: Path | None = None  # ... and then only below this directory, when given


DEFAULT_LIMITS = MediaLimits()
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
REMOTE_TIMEOUT = 30.0  # seconds for one remote media download


def media_bytes(source: MediaSource, limits: MediaLimits = DEFAULT_LIMITS) -> bytes:
    """The encoded bytes of ``source``: a ``data:`` URI (base64), a file path or ``file://`` URL, bare
    base64 text, or an http(s) URL when ``limits.allow_remote`` (else RemoteMediaRefusedError)."""
    url = source.url
    if url.startswith(("http://", "https://")):
        return _fetch(url, limits)
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise MediaError(f"a media data URI must be 'data:<mime>;base64,<data>', not {header[:60]!r}.")
        if not header.startswith(("data:image/", "data:audio/")):
            raise MediaError(f"a media data URI must be of an image/ or audio/ type, not {header[5:60]!r}.")
        return _decode_base64(payload, limits)
    if url.startswith("file://") or (len(url) < 4096 and (not _BASE64.fullmatch(url) or os.path.exists(url))):
        return _read_file(url.removeprefix("file://"), limits)
    return _decode_base64(url, limits)  # bare base64, as llama-server takes it


def _fetch(url: str, limits: MediaLimits) -> bytes:
    if not limits.allow_remote:
        raise RemoteMediaRefusedError(f"remote media URLs are not fetched ({url[:80]}); send the bytes as a data: "
                                      "URI (a server fetches them only when started with --allow-remote-media).")
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT) as response:
            data: bytes = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MediaError(f"cannot fetch the media at {url[:80]}: {getattr(exc, 'reason', exc)}.") from None
    if len(data) > limits.max_bytes:
        raise MediaTooLargeError(f"the media at {url[:80]} is larger than the limit of {limits.max_bytes} bytes.")
    if not data:
        raise MediaError(f"the media at {url[:80]} is empty.")
    return data


def _decode_base64(payload: str, limits: MediaLimits) -> bytes:
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise MediaTooLargeError(f"the media is larger than the limit of {limits.max_bytes} bytes.")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the media's base64 data is malformed; encode the file with standard base64.") from None
    if not data:
        raise MediaError("the media is empty.")
    return data


def _read_file(name: str, limits: MediaLimits) -> bytes:
    if not limits.allow_files:
        raise MediaError("local media files are not read here; send the bytes as a data: URI (a server reads "
                         "files only below the directory of its --media-path).")
    path = Path(name).expanduser()
    if limits.file_root is not None:
        root = limits.file_root.resolve()
        path = (root / path.relative_to("/") if path.is_absolute() else root / path).resolve()
        if root not in path.parents:
            raise MediaError(f"{name[:80]!r} is outside the media directory; name a file below it.")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise MediaError(f"{path} is not a file; give an image or audio file, or a data: URI.")
        if size > limits.max_bytes:
            raise MediaTooLargeError(f"{path} has {size} bytes, more than the limit of {limits.max_bytes}.")
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"cannot read the media file {name[:200]}: {exc.strerror or exc}.") from None
    if not data:
        raise MediaError(f"{path} is empty.")
    return data


class Projector(Owned):
    """A model's multimodal projector (``mtmd_context``): loaded with ``Model.load(..., mmproj=...)``,
    shared by every context of the model (its encoder runs one media at a time)."""

    _kind = "projector"
    _close_order = 1  # before the model it refers to

    def __init__(self, model: Model, path: str | os.PathLike[str], n_threads: int | None = None) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise ModelLoadError(f"projector file not found: {self.path}; pass the path of an mmproj .gguf file.")
        mtmd = _library.get_mtmd()
        ffi, lib = mtmd.ffi, mtmd.lib
        params = lib.mtmd_context_params_default()
        # A marker no text will hold by chance (llama-server makes one the same way).
        self.marker = f"<__media_{secrets.token_hex(8)}__>"
        marker = ffi.new("char[]", self.marker.encode())
        params.media_marker = marker
        params.use_gpu = bool(model.offloaded)
        params.n_threads = n_threads or default_threads()
        params.warmup = False
        ptr = lib.mtmd_init_from_file(os.fsencode(self.path), model.ptr, params)
        if ptr == ffi.NULL:
            raise ModelLoadError(f"llama.cpp could not load the projector {self.path}: it is corrupt, not an mmproj "
                                 "GGUF, or made for a model of another embedding size. Enable logging for "
                                 "'mullama.llama_cpp' to see its reason.")
        self._mtmd = mtmd
        self._own(ffi, ptr, lib.mtmd_free)
        self.supports_vision = bool(lib.mtmd_support_vision(ptr))
        self.supports_audio = bool(lib.mtmd_support_audio(ptr))
        self.uses_mrope = bool(lib.mtmd_decode_use_mrope(ptr))  # decoded at M-RoPE positions (see _positions)
        self.lock = threading.Lock()  # mtmd's encoder is not thread-safe
        self._options = lib.mtmd_helper_init_opt_default()

    def tokenize(self, prompt: str, sources: Sequence[MediaSource],
                 limits: MediaLimits = DEFAULT_LIMITS) -> MediaPrompt:
        """The chunks of ``prompt`` (which holds one marker per source) with the media read and checked."""
        if len(sources) > limits.max_items:
            raise MediaTooLargeError(f"{len(sources)} media in one request, more than the limit of "
                                     f"{limits.max_items}.")
        ffi, lib = self._mtmd.ffi, self._mtmd.lib
        bitmaps = []
        for number, source in enumerate(sources):
            wanted = self.supports_vision if source.kind == "image" else self.supports_audio
            if not wanted:
                raise MediaNotSupportedError(f"this model's projector does not take {source.kind} input.")
            data = media_bytes(source, limits)
            check_media_header(data, source.kind, limits, number)
            wrapper = lib.mtmd_helper_bitmap_init_from_buf(self.ptr, data, len(data), False, self._options)
            if wrapper.bitmap == ffi.NULL:
                raise MediaError(f"media {number} cannot be decoded: a corrupt or truncated file, or a format "
                                 "the projector does not read (images: JPEG, PNG, BMP, GIF; audio: WAV, MP3, "
                                 "FLAC).")
            bitmaps.append(ffi.gc(wrapper.bitmap, lib.mtmd_bitmap_free))
            if wrapper.video_ctx != ffi.NULL:  # a build with video input decoded it as one: not taken here
                lib.mtmd_helper_video_free(wrapper.video_ctx)
                raise MediaError(f"media {number} is a video; send images (JPEG, PNG, BMP, GIF) or audio.")
            if (source.kind == "image") != (not lib.mtmd_bitmap_is_audio(wrapper.bitmap)):
                raise MediaError(f"media {number} was sent as {source.kind} but holds "
                                 f"{'audio' if source.kind == 'image' else 'an image'}.")
        return MediaPrompt(self, prompt, bitmaps)


class MediaPrompt:
    """A tokenized prompt of text and media chunks: ``tokens`` (media positions hold placeholders)
    and ``evaluate`` to make a context's cache hold it."""

    def __init__(self, projector: Projector, prompt: str, bitmaps: list[Any]) -> None:
        ffi, lib = projector._mtmd.ffi, projector._mtmd.lib
        self._projector = projector
        chunks = lib.mtmd_input_chunks_init()
        self._chunks = ffi.gc(chunks, lib.mtmd_input_chunks_free)
        text = ffi.new("char[]", prompt.encode("utf-8", "surrogatepass"))
        entry = ffi.new("mtmd_input_text *", {"text": text, "text_len": len(ffi.string(text)), "add_special": True,
                                              "parse_special": True})
        array = ffi.new("mtmd_bitmap *[]", bitmaps or 1)
        with projector.lock:
            rc = lib.mtmd_tokenize(projector.ptr, chunks, entry, array, len(bitmaps))
        if rc == 1:
            raise MediaError(f"the prompt holds a different number of media markers than the {len(bitmaps)} media "
                             "given.")
        if rc != 0:
            raise MediaError("the projector could not preprocess the media (a corrupt or unusable image or clip).")
        self.tokens: list[int] = []
        self.pieces: list[tuple[int, int, Any, int]] = []  # (start, end, chunk, positions if media else 0)
        self.media_count = 0
        self.head_end = 0
        for index in range(lib.mtmd_input_chunks_size(chunks)):
            chunk = lib.mtmd_input_chunks_get(chunks, index)
            start = len(self.tokens)
            if lib.mtmd_input_chunk_get_type(chunk) == lib.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ffi.new("size_t *")
                ids = lib.mtmd_input_chunk_get_tokens_text(chunk, count)
                self.tokens.extend(ffi.unpack(ids, count[0]))
                self.pieces.append((start, len(self.tokens), chunk, 0))
            else:
                media_id = ffi.string(lib.mtmd_input_chunk_get_id(chunk)).decode("ascii", "replace")
                placeholder = -1 - int(media_id[:12] or "0", 16) % _PLACEHOLDER_SPAN
                self.tokens.extend([placeholder] * lib.mtmd_input_chunk_get_n_tokens(chunk))
                self.pieces.append((start, len(self.tokens), chunk, lib.mtmd_input_chunk_get_n_pos(chunk)))
                self.media_count += 1
                self.head_end = len(self.tokens)  # where the last media chunk ends
        if self.pieces and self.pieces[-1][3]:
            raise MediaError("a prompt must end with text after its last image or audio clip.")

    @property
    def text_tokens(self) -> list[int]:
        """The prompt's text tokens (what the penalties see: llama-server shows them no media)."""
        return [token for token in self.tokens if token >= 0]

    def reusable(self, cached: list[int], reuse: bool) -> int:
        """How much of a cache holding ``cached`` this prompt keeps: the common prefix, cut back to the
        start of the chunk it would end inside, unless that is the text after the last media (the
        chunks before it are evaluated whole)."""
        common = reusable_prefix(cached, self.tokens, reuse)
        for start, end, _chunk, _media in self.pieces:
            if start < common < end and end <= self.head_end:
                return start
        return common

    def evaluate_head(self, ptr: Any, seq_id: int, cached: list[int], positions: CachePositions, n_batch: int,
                      lock: Any) -> None:
        """Evaluate the chunks from the end of ``cached`` (a chunk boundary) through the last media
        chunk into sequence ``seq_id`` of the llama context ``ptr``, as llama-server does: a text chunk
        decoded, a media chunk encoded and its embeddings decoded at their positions (M-RoPE and
        non-causal where the projector says; mtmd's helper sets and resets the causal attention around
        the chunk, under ``lock``, so no other sequence's batch runs in between). ``cached`` and
        ``positions`` grow with them; the text after the last media is the caller's to decode, as any
        prompt's, from position ``len(cached) + positions.shift``. On failure (MediaError) the caller
        drops the cells past ``cached``."""
        projector = self._projector
        ffi, lib = projector._mtmd.ffi, projector._mtmd.lib
        new_n_past = ffi.new("llama_pos *")
        for start, end, chunk, n_pos in self.pieces:
            if end <= len(cached) or start >= self.head_end:
                continue
            with projector.lock, lock:
                rc = lib.mtmd_helper_eval_chunk_single(projector.ptr, ptr, chunk, start + positions.shift, seq_id,
                                                       n_batch, False, new_n_past)
            if rc != 0:
                raise MediaError(f"the projector failed to encode or decode a chunk of the prompt (code {rc}).")
            cached.extend(self.tokens[start:end])
            if n_pos:
                positions.add(start, end, n_pos)

    def evaluate(self, context: Any, deadline: float | None, reuse: bool) -> int:
        """Make ``context``'s cache (sequence 0) hold this prompt, evaluating what differs; returns
        how many positions were reused."""
        if len(self.tokens) > context.n_ctx:
            raise ContextOverflowError(f"the prompt has {len(self.tokens)} positions (text and media) but the "
                                       f"context holds {context.n_ctx}; shorten it or use a larger n_ctx.")
        cached, positions = context._tokens, context._positions
        common = trim_cache(context._lib, context._memory, 0, cached, self.reusable(cached, reuse), positions)
        try:
            self.evaluate_head(context.ptr, 0, cached, positions, context.n_batch, context._lock)
        except MediaError:
            context._lib.llama_memory_seq_rm(context._memory, 0, len(cached) + positions.shift, -1)
            raise
        breaks = prompt_breaks(context.model, len(self.tokens), context.n_batch)  # as the engine's (and upstream's)
        context._decode(self.tokens[len(cached):], deadline, breaks)
        return common


def check_projector_model(model: Model) -> Projector:
    """The model's projector, or MediaNotSupportedError when it was loaded without one."""
    projector = getattr(model, "projector", None)
    if projector is None:
        raise MediaNotSupportedError("this model takes text only: load it with a projector, "
                                     "Model.load(path, mmproj=...), to send images or audio.")
    if not isinstance(projector, Projector):
        raise InvalidConfigError("model.projector is not a mullama projector.")
    return projector

