"""Ogg/Opus streams as the conversation protocol carries them: 24 kHz mono, both ways.

Each audio message of the wire protocol holds one or more whole Ogg pages of one Opus
stream (the reference web client sends the pages its recorder makes, the reference server
sends what `sphn.OpusStreamWriter` makes). `sphn` does the Opus work; this module adds the
checks the server needs: sphn's reader silently swallows bytes that are not Ogg and then
fails on every later message, so a single malformed message would kill a conversation.
We therefore validate every message (page structure and CRC) before sphn sees it.
"""

from __future__ import annotations

import struct

import numpy as np
import sphn

from personaplex.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from personaplex.errors import InvalidAudioError

_CAPTURE_PATTERN = b"OggS"
# capture pattern, version, header type, granule position, serial, page sequence, CRC,
# number of segments: the fixed 27-byte head of every Ogg page (RFC 3533).
_PAGE_HEAD = struct.Struct("<4sBBqIIIB")
_CRC_OFFSET = 22


def _make_crc_table() -> tuple[int, ...]:
    """Table for Ogg's CRC-32: polynomial 0x04C11DB7, not bit-reflected (unlike zlib's)."""
    table = []
    for byte in range(256):
        crc = byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else (crc << 1)
        table.append(crc & 0xFFFFFFFF)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def ogg_crc(data: bytes) -> int:
    """The Ogg page checksum of `data` (computed with the CRC field set to zero)."""
    crc = 0
    table = _CRC_TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ byte]
    return crc


def split_ogg_pages(data: bytes) -> list[bytes]:
    """Split `data` into whole Ogg pages, checking each page's structure and checksum.

    Raises InvalidAudioError naming what is wrong: a message must hold only complete pages.
    """
    pages: list[bytes] = []
    offset = 0
    while offset < len(data):
        page_length = _page_length(data, offset)
        page = data[offset : offset + page_length]
        stored_crc = struct.unpack_from("<I", page, _CRC_OFFSET)[0]
        zeroed = page[:_CRC_OFFSET] + b"\x00\x00\x00\x00" + page[_CRC_OFFSET + 4 :]
        if ogg_crc(zeroed) != stored_crc:
            raise InvalidAudioError(f"Ogg page {len(pages)} has a bad checksum")
        pages.append(page)
        offset += page_length
    if not pages:
        raise InvalidAudioError("the audio message is empty: send whole Ogg/Opus pages")
    return pages


def _page_length(data: bytes, offset: int) -> int:
    """Length of the Ogg page starting at `offset`, after checking its head fits."""
    capture = data[offset : offset + len(_CAPTURE_PATTERN)]
    if capture != _CAPTURE_PATTERN[: len(capture)]:
        raise InvalidAudioError(
            f"the audio message is not Ogg/Opus (expected 'OggS' at byte {offset}, got {capture!r})"
        )
    if len(data) - offset < _PAGE_HEAD.size:
        raise InvalidAudioError("the audio message ends inside an Ogg page head")
    _capture, version, *_, segment_count = _PAGE_HEAD.unpack_from(data, offset)
    if version != 0:
        raise InvalidAudioError(f"unsupported Ogg version {version}")
    lacing_start = offset + _PAGE_HEAD.size
    if len(data) < lacing_start + segment_count:
        raise InvalidAudioError("the audio message ends inside an Ogg segment table")
    body_length = sum(data[lacing_start : lacing_start + segment_count])
    page_length = _PAGE_HEAD.size + segment_count + body_length
    if len(data) - offset < page_length:
        raise InvalidAudioError("the audio message ends inside an Ogg page")
    return page_length


# Opus frame lengths in 48 kHz samples by TOC configuration (RFC 6716, section 3.1):
# SILK 10/20/40/60 ms, hybrid 10/20 ms, CELT 2.5/5/10/20 ms.
_SILK_FRAMES = (480, 960, 1920, 2880)
_HYBRID_FRAMES = (480, 960)
_CELT_FRAMES = (120, 240, 480, 960)
_OPUS_RATE = 48_000
_CONTINUED_PACKET = 0x01
_HEADER_PACKETS = (b"OpusHead", b"OpusTags")


def opus_seconds(message: bytes) -> float:
    """How much audio the Opus packets of `message` (whole Ogg pages) hold, read from their
    TOC bytes without decoding or checksumming: what admitting the message will cost.

    Raises InvalidAudioError when the pages are malformed (as split_ogg_pages would).
    """
    samples = 0
    offset = 0
    while offset < len(message):
        page_length = _page_length(message, offset)
        header_type, segment_count = message[offset + 5], message[offset + _PAGE_HEAD.size - 1]
        lacing = message[offset + _PAGE_HEAD.size : offset + _PAGE_HEAD.size + segment_count]
        position = offset + _PAGE_HEAD.size + segment_count
        packet_start = not header_type & _CONTINUED_PACKET
        for size in lacing:
            if packet_start and size:
                samples += _packet_samples(message[position : position + size])
            position += size
            packet_start = size < 255  # a lacing value of 255 continues the packet
        offset += page_length
    return samples / _OPUS_RATE


def _packet_samples(packet: bytes) -> int:
    """48 kHz samples of the Opus packet starting with `packet` (0 for the stream headers)."""
    if packet.startswith(_HEADER_PACKETS):
        return 0
    config, code = packet[0] >> 3, packet[0] & 0x03
    if config < 12:
        frame = _SILK_FRAMES[config % 4]
    elif config < 16:
        frame = _HYBRID_FRAMES[config % 2]
    else:
        frame = _CELT_FRAMES[config % 4]
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    else:
        count = packet[1] & 0x3F if len(packet) > 1 else 0
    return frame * count


class OpusStreamEncoder:
    """Turns float32 PCM into Ogg/Opus bytes, one page per 80 ms frame.

    PCM of any length may be given; samples that do not fill a frame wait for the next call.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self._writer = sphn.OpusStreamWriter(sample_rate)
        self._pending = np.zeros(0, dtype=np.float32)

    def encode(self, pcm: np.ndarray) -> bytes:
        """Ogg/Opus bytes for every whole frame buffered so far (b"" if none is complete)."""
        self._pending = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32)])
        whole_frames = len(self._pending) // FRAME_SAMPLES
        encoded = bytearray()
        for index in range(whole_frames):
            frame = self._pending[index * FRAME_SAMPLES : (index + 1) * FRAME_SAMPLES]
            encoded += self._writer.append_pcm(np.clip(frame, -1.0, 1.0))
        self._pending = self._pending[whole_frames * FRAME_SAMPLES :]
        return bytes(encoded)


class OpusStreamDecoder:
    """Turns Ogg/Opus messages back into float32 PCM, rejecting malformed messages.

    A rejected message raises InvalidAudioError and leaves the decoder usable for the
    next, well-formed one.
    """

    def __init__(self, sample_rate: int = SAMPLE_RATE) -> None:
        self._sample_rate = sample_rate
        self._reader = sphn.OpusStreamReader(sample_rate)

    def decode(self, message: bytes) -> np.ndarray:
        """The PCM carried by `message` (possibly empty: Opus header pages carry none)."""
        split_ogg_pages(message)
        try:
            pcm = self._reader.append_bytes(message)
        except ValueError as err:
            # The pages were well-formed but their content was not Opus; sphn's reader is
            # left in an unknown state, and a fresh one decodes later pages without the
            # stream's header pages (sphn needs only the audio packets).
            self._reader = sphn.OpusStreamReader(self._sample_rate)
            raise InvalidAudioError(f"the Ogg pages do not hold valid Opus audio ({err})") from err
        return np.asarray(pcm, dtype=np.float32)
