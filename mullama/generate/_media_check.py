"""What an image's or audio clip's header says, checked before the bytes are decoded: an image that
declares more pixels than the limit (a decompression bomb), a clip longer than the limit, and files
cut short (a truncated JPEG, PNG, WAV or MP3), which the decoders would otherwise take in part (stb_image
fills the rest of an image with grey; miniaudio plays what is there)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._exceptions import MediaError, MediaTooLargeError

if TYPE_CHECKING:
    from ._media import MediaLimits

__all__ = ["audio_seconds", "check_media_header", "image_size"]


def check_media_header(data: bytes, kind: str, limits: MediaLimits, number: int) -> None:
    """Refuse media ``number`` (MediaError) when its header declares more than ``limits`` allow or
    shows the file is cut short; formats whose header is not read here are left to the decoder."""
    if kind == "audio":
        seconds = audio_seconds(data, number)
        if seconds is not None and seconds > limits.max_audio_seconds:
            raise MediaTooLargeError(f"audio {number} lasts {seconds:.0f} s, more than the limit of "
                                     f"{limits.max_audio_seconds:.0f} s; send a shorter clip.")
        return
    size = image_size(data)
    if size is not None and size[0] * size[1] > limits.max_pixels:
        raise MediaTooLargeError(f"image {number} is {size[0]}x{size[1]} pixels, more than the limit of "
                                 f"{limits.max_pixels}.")
    if (data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:]) or (
            data[:8] == b"\x89PNG\r\n\x1a\n" and b"IEND" not in data[-64:]):
        raise MediaError(f"image {number} is truncated (its JPEG or PNG end marker is missing); send the whole file.")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image header, or None when the format is not one of these."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:2] == b"BM" and len(data) >= 26:
        return abs(int.from_bytes(data[18:22], "little", signed=True)), abs(
            int.from_bytes(data[22:26], "little", signed=True))
    if data[:2] == b"\xff\xd8":
        index = 2
        while index + 9 < len(data):
            if data[index] != 0xFF:
                return None
            marker = data[index + 1]
            length = int.from_bytes(data[index + 2:index + 4], "big")
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = data[index + 5:index + 7], data[index + 7:index + 9]
                return int.from_bytes(width, "big"), int.from_bytes(height, "big")
            index += 2 + length
    return None


def audio_seconds(data: bytes, number: int) -> float | None:
    """How long a WAV, MP3 or FLAC clip lasts by its headers (None when they do not say), the longest
    of what they declare: miniaudio allocates the samples a header declares before it reads them (a
    FLAC STREAMINFO, an MP3's Xing or Info frame count, a WAV's fact chunk). MediaError when a WAV's
    data chunk or an MP3's last frame goes past the end of the file, when an MP3 declares more frames
    than it holds, or for a compressed (ADPCM) WAV."""
    start = _id3_size(data)
    magic = data[start:start + 4]
    if magic == b"RIFF" and data[start + 8:start + 12] == b"WAVE":
        return _wav_seconds(data[start:], number)
    if magic == b"fLaC" and len(data) >= start + 26:
        info = int.from_bytes(data[start + 18:start + 26], "big")  # STREAMINFO: rate 20 bits, ..., samples 36 bits
        rate, samples = info >> 44, info & ((1 << 36) - 1)
        return samples / rate if rate and samples else None
    if magic[:1] == b"\xff" or start:
        return _mp3_seconds(data, start, number)
    return None


def _id3_size(data: bytes) -> int:
    """The length of an ID3v2 tag at the start of ``data`` (0 when there is none)."""
    if data[:3] != b"ID3" or len(data) < 10:
        return 0
    size = sum((byte & 0x7F) << (7 * (3 - i)) for i, byte in enumerate(data[6:10]))
    return 10 + size + (10 if data[5] & 0x10 else 0)  # a footer


# WAV format tags miniaudio decodes sample by sample (PCM, float, A-law, mu-law); extensible names one.
_WAV_TAGS = (1, 3, 6, 7)


def _wav_seconds(data: bytes, number: int) -> float | None:
    index, channels, rate, bits, declared = 12, 0, 0, 0, 0
    while index + 8 <= len(data):
        chunk, size = data[index:index + 4], int.from_bytes(data[index + 4:index + 8], "little")
        body = data[index + 8:index + 8 + min(size, 64)]
        if chunk == b"fmt " and len(body) >= 16:
            tag = int.from_bytes(body[0:2], "little")
            if tag == 0xFFFE and len(body) >= 26:
                tag = int.from_bytes(body[24:26], "little")
            if tag not in _WAV_TAGS:
                raise MediaError(f"audio {number} is a WAV of format tag {tag:#x}, which is not read here; send "
                                 "PCM or float WAV, MP3 or FLAC.")
            channels, rate = int.from_bytes(body[2:4], "little"), int.from_bytes(body[4:8], "little")
            bits = int.from_bytes(body[14:16], "little")
        elif chunk == b"fact" and len(body) >= 4:
            declared = int.from_bytes(body[0:4], "little")
        elif chunk == b"data":
            available = len(data) - index - 8
            if size in (0, 0xFFFFFFFF):  # a streamed WAV: the length was not known when it was written
                size = available
            elif size > available:
                raise MediaError(f"audio {number} is truncated: its WAV data chunk declares {size} bytes but "
                                 f"{available} follow; send the whole file.")
            if not (channels and rate and bits):
                return None  # no usable fmt chunk before the data: the decoder refuses it
            frames = max(size // (channels * ((bits + 7) // 8)), declared)
            return frames / rate
        index += 8 + size + (size & 1)
    return None


# MPEG audio frame headers: kbit/s by (MPEG-1?, layer) and bitrate index; Hz by version and rate index.
_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_BITRATES[(False, 3)] = _BITRATES[(False, 2)]
_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mp3_seconds(data: bytes, index: int, number: int) -> float | None:
    """Walk the MPEG frames from ``index`` (after any ID3v2 tag) as far as their headers are valid (a
    trailing tag or junk ends the walk, as the decoder skips it); the frames' samples give the length.
    A Xing or Info header (in the first frame) that declares more frames than there are is refused:
    the decoder would allocate them all."""
    seconds, frames, declared = 0.0, 0, None
    while index + 4 <= len(data):
        b1, b2 = data[index + 1], data[index + 2]
        version, layer = (b1 >> 3) & 3, 4 - ((b1 >> 1) & 3)
        bitrate_index, rate_index = b2 >> 4, (b2 >> 2) & 3
        if (data[index] != 0xFF or b1 & 0xE0 != 0xE0 or version == 1 or layer == 4 or bitrate_index in (0, 15)
                or rate_index == 3):
            break
        mpeg1 = version == 3
        bitrate = _BITRATES[(mpeg1, layer)][bitrate_index] * 1000
        rate = _SAMPLE_RATES[version][rate_index]
        padding = (b2 >> 1) & 1
        if layer == 1:
            length, samples = (12 * bitrate // rate + padding) * 4, 384
        else:
            samples = 1152 if mpeg1 or layer == 2 else 576
            length = samples // 8 * bitrate // rate + padding
        if index + length > len(data):
            raise MediaError(f"audio {number} is truncated: its last MP3 frame needs {length} bytes but "
                             f"{len(data) - index} are left; send the whole file.")
        if frames == 0:
            declared = _xing_frames(data[index:index + min(length, 64)])
        seconds += samples / rate
        frames += 1
        index += length
    if declared is not None and declared > frames:
        raise MediaError(f"audio {number} declares {declared} MP3 frames in its Xing/Info header but holds "
                         f"{frames}; it is truncated or corrupt: send the whole file.")
    return seconds or None


def _xing_frames(frame: bytes) -> int | None:
    """The frame count a Xing or Info header in an MP3's first frame declares (None when it has none)."""
    for tag in (b"Xing", b"Info"):
        at = frame.find(tag, 4)
        if at >= 0 and len(frame) >= at + 12 and frame[at + 7] & 1:
            count = int.from_bytes(frame[at + 8:at + 12], "big")
            return None if count == 0xFFFFFFFF else count
    return None
