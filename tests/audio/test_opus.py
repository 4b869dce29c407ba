"""Ogg/Opus as the protocol carries it: our page checks agree with libogg's pages,
audio survives a round trip, and malformed messages are refused without harming the stream."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import sphn

from personaplex.audio.opus import OpusStreamDecoder, OpusStreamEncoder, ogg_crc, split_ogg_pages
from personaplex.errors import InvalidAudioError

RATE = 24_000
FRAME = 1_920


def sine(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def encode_frames(pcm: np.ndarray) -> list[bytes]:
    encoder = OpusStreamEncoder()
    return [encoder.encode(pcm[i : i + FRAME]) for i in range(0, len(pcm), FRAME)]


def test_checksum_agrees_with_the_pages_sphn_writes():
    writer = sphn.OpusStreamWriter(RATE)
    data = writer.append_pcm(sine(0.08))
    pages = split_ogg_pages(data)  # raises if any of libogg's checksums disagreed with ours
    assert len(pages) >= 3  # OpusHead, OpusTags, audio
    assert pages[0][28:36] == b"OpusHead"
    assert ogg_crc(b"") == 0


def test_round_trip_keeps_length_and_pitch():
    pcm = sine(0.96, hz=440.0)  # 12 whole frames
    decoder = OpusStreamDecoder()
    decoded = np.concatenate([decoder.decode(message) for message in encode_frames(pcm)])
    assert len(decoded) == len(pcm)
    spectrum = np.abs(np.fft.rfft(decoded[RATE // 4 :]))
    peak_hz = np.argmax(spectrum) * RATE / len(decoded[RATE // 4 :])
    assert abs(peak_hz - 440.0) < 5.0
    # Opus is lossy but a pure tone comes back at its level.
    assert np.sqrt(np.mean(decoded[RATE // 4 :] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.15)


def test_encoder_keeps_partial_frames_for_the_next_call():
    encoder = OpusStreamEncoder()
    assert encoder.encode(sine(0.04)) == b""  # 960 samples: half a frame
    assert encoder.encode(sine(0.04)) != b""  # now a whole frame


@pytest.mark.parametrize(
    "message, complaint",
    [
        (b"", "empty"),
        (b"not ogg at all, just bytes", "not Ogg"),
        (b"OggS\x00", "ends inside an Ogg page head"),
    ],
)
def test_malformed_messages_are_refused(message: bytes, complaint: str):
    with pytest.raises(InvalidAudioError, match=complaint):
        OpusStreamDecoder().decode(message)


def test_truncated_and_corrupted_pages_are_refused_and_the_stream_goes_on():
    messages = encode_frames(sine(0.8))
    decoder = OpusStreamDecoder()
    assert len(decoder.decode(messages[0])) == FRAME
    with pytest.raises(InvalidAudioError, match="ends inside"):
        decoder.decode(messages[1][:-10])
    corrupted = bytearray(messages[1])
    corrupted[-5] ^= 0xFF
    with pytest.raises(InvalidAudioError, match="checksum"):
        decoder.decode(bytes(corrupted))
    with pytest.raises(InvalidAudioError, match="not Ogg"):
        decoder.decode(b"garbage" * 10)
    # The refused messages never reached the Opus reader: the stream decodes on.
    for message in messages[2:]:
        assert len(decoder.decode(message)) == FRAME


def test_a_valid_page_with_a_bad_version_is_refused():
    page = bytearray(split_ogg_pages(encode_frames(sine(0.08))[0])[-1])
    page[4] = 1
    page[22:26] = b"\x00\x00\x00\x00"
    page[22:26] = struct.pack("<I", ogg_crc(bytes(page)))
    with pytest.raises(InvalidAudioError, match="version"):
        OpusStreamDecoder().decode(bytes(page))
