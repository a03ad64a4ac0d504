"""Images and audio in chat messages: OpenAI's content parts (``image_url``, ``input_audio``) taken
out of the messages, each replaced by a media marker that the projector's tokenizer later turns
into the media's embeddings (as llama-server does before it renders the template)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._exceptions import MediaError

__all__ = ["AUDIO_FORMATS", "MEDIA_MARKER_PART", "MEDIA_PART_TYPES", "MediaSource", "has_media", "split_media"]

#: The part type a media part becomes: its text is the marker (llama.cpp's "media_marker").
MEDIA_MARKER_PART = "media_marker"
#: OpenAI's content part types that carry media.
MEDIA_PART_TYPES = frozenset({"image_url", "input_audio"})
#: The ``input_audio.format`` values taken: the containers libmtmd's decoder (miniaudio) reads.
AUDIO_FORMATS = ("wav", "mp3", "flac")


@dataclass(frozen=True)
class MediaSource:
    """Where one image or audio clip of a chat comes from, as the message gave it: ``url`` is a
    ``data:`` URI, a file path (or ``file://`` URL), an http(s) URL, or bare base64 text."""

    kind: str  # "image" or "audio"
    url: str


def has_media(messages: Any) -> bool:
    """Whether any message holds an image or audio part (a cheap look, no checks)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, Sequence) and not isinstance(content, str):
            if any(isinstance(part, Mapping) and part.get("type") in MEDIA_PART_TYPES for part in content):
                return True
    return False


def _source(part: Mapping[str, Any], where: str) -> MediaSource:
    if part.get("type") == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, Mapping) else image  # a bare string is accepted too
        if not isinstance(url, str) or not url:
            raise MediaError(f"{where}: an image_url part needs {{'image_url': {{'url': 'data:image/...;base64,...'"
                             "}} (a data URI or a file path).")
        return MediaSource("image", url)
    audio = part.get("input_audio")
    audio = audio if isinstance(audio, Mapping) else {}
    data = audio.get("data") or audio.get("url")
    if not isinstance(data, str) or not data:
        raise MediaError(f"{where}: an input_audio part needs {{'input_audio': {{'data': '<base64>', "
                         "'format': 'wav' or 'mp3'}}.")
    # The decoder reads the container from the bytes (as llama-server, which ignores the field), but a
    # format it cannot read is refused here with a clear message instead of as undecodable data.
    declared = audio.get("format")
    if declared is not None and (not isinstance(declared, str) or declared.lower() not in AUDIO_FORMATS):
        raise MediaError(f"{where}: input_audio.format {declared!r} is not one of {', '.join(AUDIO_FORMATS)} "
                         "(the audio formats that can be decoded); convert the clip to one of them.")
    return MediaSource("audio", data)


def split_media(messages: Any, marker: str) -> tuple[Any, list[MediaSource]]:
    """``messages`` with every image and audio part replaced by a ``media_marker`` part whose text is
    ``marker``, and the media in the order they appear (the order of the markers in the prompt)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        return messages, []
    result: list[Any] = []
    sources: list[MediaSource] = []
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, Sequence) or isinstance(content, str):
            result.append(message)
            continue
        parts = []
        for number, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") in MEDIA_PART_TYPES:
                sources.append(_source(part, f"messages[{index}].content[{number}]"))
                part = {"type": MEDIA_MARKER_PART, "text": marker}
            parts.append(part)
        result.append({**message, "content": parts})
    return result, sources
