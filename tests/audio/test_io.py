import time

import numpy as np
import pyloudnorm
import pytest
import torch

from personaplex.audio.io import (
    FRAME_SAMPLES,
    SAMPLE_RATE,
    normalize_loudness,
    prepare_user_audio,
    read_voice_wav,
    read_wav,
    resample,
    write_wav,
)
from personaplex.errors import InvalidAudioError
from tests.fixtures.wav_files import float_wav, wav_with_header


def tone(seconds: float, rate: int = SAMPLE_RATE, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def test_constants():
    assert SAMPLE_RATE == 24_000 and FRAME_SAMPLES == 1_920


def test_write_then_read_roundtrip(tmp_path):
    pcm = tone(0.5)
    path = tmp_path / "sub" / "a.wav"
    write_wav(path, pcm, SAMPLE_RATE)
    read, rate = read_wav(path)
    assert rate == SAMPLE_RATE and read.dtype == np.float32 and read.shape == pcm.shape
    np.testing.assert_allclose(read, pcm, atol=1e-4)


def test_read_wav_downmixes_unless_asked(tmp_path, monkeypatch):
    import sphn

    stereo = np.stack([tone(0.1), np.zeros(2400, np.float32)])
    monkeypatch.setattr(sphn, "read", lambda path: (stereo, 16_000))
    (tmp_path / "s.wav").write_bytes(b"x")
    mono, rate = read_wav(tmp_path / "s.wav")
    assert rate == 16_000 and mono.shape == (2400,)
    np.testing.assert_allclose(mono, stereo.mean(axis=0))
    both, _ = read_wav(tmp_path / "s.wav", mono=False)
    assert both.shape == (2, 2400)


def test_read_wav_missing_and_corrupt(tmp_path):
    with pytest.raises(InvalidAudioError, match="does not exist"):
        read_wav(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000garbage" * 20)
    with pytest.raises(InvalidAudioError, match="cannot decode"):
        read_wav(bad)


def test_write_wav_refuses_stereo(tmp_path):
    with pytest.raises(InvalidAudioError, match="mono"):
        write_wav(tmp_path / "x.wav", np.zeros((2, 100), np.float32))


@pytest.mark.parametrize("src,dst", [(16_000, 24_000), (44_100, 24_000), (48_000, 24_000)])
def test_resample_exact_length_and_no_delay(src, dst):
    pcm = np.zeros(src, np.float32)
    pcm[src // 2] = 1.0
    out = resample(pcm, src, dst)
    assert out.dtype == np.float32 and out.shape == (dst,)
    assert abs(int(np.argmax(out)) - dst // 2) <= 1


def test_resample_same_rate_is_a_copy():
    pcm = tone(0.1)
    out = resample(pcm, SAMPLE_RATE, SAMPLE_RATE)
    np.testing.assert_array_equal(out, pcm)
    assert out is not pcm


def test_normalize_loudness_reaches_target():
    pcm = tone(2.0, amplitude=0.05)
    out = normalize_loudness(pcm, SAMPLE_RATE, -24.0)
    measured = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(out.astype(np.float64))
    assert abs(measured - (-24.0)) < 0.1
    assert out.dtype == np.float32


@pytest.mark.parametrize("pcm", [np.zeros(48_000, np.float32), tone(0.1)])
def test_normalize_loudness_silent_or_short_is_unchanged(pcm):
    out = normalize_loudness(pcm, SAMPLE_RATE)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out, pcm)


def test_prepare_accepts_shapes_and_containers():
    pcm = tone(0.2)
    for audio in (pcm, pcm[None, :], pcm[:, None], torch.from_numpy(pcm), pcm.tolist()):
        out = prepare_user_audio(audio, SAMPLE_RATE)
        assert out.dtype == np.float32 and out.shape == pcm.shape and out.flags.c_contiguous
        np.testing.assert_allclose(out, pcm, atol=1e-7)


def test_prepare_bf16_tensor_and_float64():
    pcm = tone(0.1)
    assert prepare_user_audio(torch.from_numpy(pcm).bfloat16()).dtype == np.float32
    assert prepare_user_audio(pcm.astype(np.float64)).dtype == np.float32


def test_prepare_converts_int16():
    ints = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    out = prepare_user_audio(ints, SAMPLE_RATE)
    np.testing.assert_allclose(out, [0.0, 0.5, -1.0, 32767 / 32768])


def test_prepare_resamples_to_24k():
    out = prepare_user_audio(tone(1.0, rate=16_000), 16_000)
    assert out.shape == (SAMPLE_RATE,)


@pytest.mark.parametrize(
    "audio,message",
    [
        ("hello", "got str"),
        ({"a": 1}, "got dict"),
        (["a", "b"], "only numbers"),
        (np.zeros((2, 1000), np.float32), "2 channels.*downmix.*axis=0"),
        (np.zeros((1000, 2), np.float32), "2 channels.*downmix.*axis=1"),
        (np.zeros((1, 1, 2, 10), np.float32), "1-D mono"),
        (np.zeros(0, np.float32), "empty"),
        (np.array([0.0, np.nan], np.float32), "NaN"),
        (np.array([0.0, np.inf], np.float32), "NaN or infinite"),
        (np.array([True, False]), "dtype bool"),
        (np.zeros(10, np.int64), "int16/int32"),
    ],
)
def test_prepare_rejects_bad_audio(audio, message):
    with pytest.raises(InvalidAudioError, match=message):
        prepare_user_audio(audio, SAMPLE_RATE)


@pytest.mark.parametrize("rate", [0, -16000, 24000.0, "24000", True, None])
def test_prepare_rejects_bad_sample_rate(rate):
    with pytest.raises(InvalidAudioError, match="positive integer"):
        prepare_user_audio(tone(0.1), rate)


def test_prepare_accepts_numpy_integer_rate():
    assert prepare_user_audio(tone(0.1), np.int64(SAMPLE_RATE)).shape == (2400,)


def test_prepare_rejects_too_long():
    long_audio = np.zeros(241 * 8000, np.float32)
    with pytest.raises(InvalidAudioError, match="241.0 s.*240 s"):
        prepare_user_audio(long_audio, 8000)
    assert prepare_user_audio(np.zeros(24_000 * 2, np.float32), max_seconds=2.0).size == 48_000
    with pytest.raises(InvalidAudioError, match="longer than the 1 s"):
        prepare_user_audio(np.zeros(24_000 * 2, np.float32), max_seconds=1.0)


def test_streaming_resampler_is_independent_of_block_sizes():
    from personaplex.audio.io import StreamingResampler

    rate = 16_000
    t = np.arange(rate) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    whole = StreamingResampler(rate, 24_000).process(tone)
    resampler = StreamingResampler(rate, 24_000)
    sizes = [1, 7, 333, 1920, 5000, 2]
    pieces, start = [], 0
    while start < tone.size:
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(resampler.process(tone[start : start + size]))
        start += size
    streamed = np.concatenate(pieces)
    assert streamed.shape == whole.shape == (24_000,)
    np.testing.assert_allclose(streamed, whole, atol=1e-6)
    # Still a 440 Hz tone at 24 kHz, and close to the offline polyphase resampler once aligned.
    spectrum = np.abs(np.fft.rfft(streamed[2000:]))
    assert abs(np.argmax(spectrum) * 24_000 / (streamed.size - 2000) - 440) < 2
    offline = resample(tone, rate, 24_000)
    delay = int(np.argmax(np.correlate(streamed[1000:3000], offline[1000:1100], mode="valid")))
    np.testing.assert_allclose(streamed[1000 + delay : 20_000 + delay], offline[1000:20_000], atol=2e-2)


@pytest.mark.parametrize("rate", [0, 1, 7_999, 400_000])
def test_read_wav_refuses_impossible_header_rates_at_once(tmp_path, capfd, rate):
    path = wav_with_header(tmp_path / "odd.wav", rate, np.zeros(200))
    started = time.perf_counter()
    with pytest.raises(InvalidAudioError, match=f"sample rate is {rate} Hz, outside 8000..384000"):
        prepare_user_audio(*read_wav(path))
    assert time.perf_counter() - started < 1.0  # a 1 Hz header took 99 s of resampling
    assert "panicked" not in capfd.readouterr().err  # the decoder's Rust panic (0 Hz)


def test_read_wav_refuses_header_only_file(tmp_path):
    with pytest.raises(InvalidAudioError, match="holds no samples"):
        read_wav(wav_with_header(tmp_path / "empty.wav", 16_000))


@pytest.mark.parametrize("rate", [7_999, 384_001])
def test_prepare_rejects_rates_outside_the_recording_range(rate):
    with pytest.raises(InvalidAudioError, match="outside 8000..384000"):
        prepare_user_audio(tone(0.1), rate)


def test_read_voice_wav_checks_and_resamples(tmp_path):
    path = tmp_path / "me.wav"
    write_wav(path, tone(1.0, rate=16_000), 16_000)
    assert read_voice_wav(path).shape == (SAMPLE_RATE,)
    with pytest.raises(InvalidAudioError, match="voice recording .*nope.wav does not exist"):
        read_voice_wav(tmp_path / "nope.wav")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_read_voice_wav_refuses_nan_and_inf(tmp_path, bad):
    samples = np.zeros(4_800, np.float32)
    samples[100] = bad
    with pytest.raises(InvalidAudioError, match="voice recording .*bad.wav contains NaN or infinite"):
        read_voice_wav(float_wav(tmp_path / "bad.wav", samples))


def test_read_voice_wav_refuses_long_recordings_before_resampling(tmp_path, monkeypatch):
    import personaplex.audio.io as io

    path = wav_with_header(tmp_path / "speech.wav", 16_000, np.zeros(16_000 * 31))
    monkeypatch.setattr(io, "resample", lambda *a: pytest.fail("resampled a refused voice"))
    with pytest.raises(InvalidAudioError, match="speech.wav lasts 31.0 s; a voice prompt may last at most 30 s"):
        read_voice_wav(path)
