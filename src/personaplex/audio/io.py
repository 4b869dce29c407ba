"""Audio in and out: reading and writing files, resampling, loudness, input validation.

The model hears and speaks 24 kHz mono float32 PCM in frames of 1920 samples (80 ms).
Everything a user hands us goes through `prepare_user_audio`, which turns the usual
mistakes (stereo, int16, NaN, a wrong sample rate) into one clear error or a silent fix.
"""

from __future__ import annotations

import math
import wave
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import sphn
import torch

from personaplex.audio.format import FRAME_SAMPLES, SAMPLE_RATE
from personaplex.errors import InvalidAudioError

# The temporal transformer's KV cache holds 3000 frames of 80 ms: longer input falls out of
# the model's context, so we refuse it instead of silently forgetting the start.
MAX_SECONDS = 240.0
VOICE_PROMPT_LUFS = -24.0
# A voice prompt is a short sample of a speaker (the presets hold about 10 s); it shares the
# context with the system prompt, and encoding costs time, so longer recordings are refused
# before any work is done.
MAX_VOICE_SECONDS = 30.0
# Rates outside this range are no real recording: a header claiming 1 Hz would make the
# resampler build a filter millions of taps long, one claiming 0 Hz crashes the decoder.
MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 384_000

# Integer PCM formats we convert silently, with the value that maps to full scale.
_INT_FULL_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0}


def read_wav(path: str | Path, *, mono: bool = True) -> tuple[np.ndarray, int]:
    """Read an audio file (WAV, FLAC, MP3, Ogg: whatever sphn decodes).

    Returns (pcm, sample_rate) with pcm float32, 1-D when `mono` (channels averaged),
    otherwise [channels, samples]. A file without samples, or whose sample rate is outside
    MIN_SAMPLE_RATE..MAX_SAMPLE_RATE, raises InvalidAudioError.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidAudioError(f"audio file {path} does not exist: check the path")
    header_rate = _wav_header_sample_rate(path)
    if header_rate is not None:  # checked before decoding: the decoder panics on 0 Hz
        _check_file_sample_rate(path, header_rate)
    try:
        pcm, sample_rate = sphn.read(str(path))
    except (ValueError, OSError) as err:
        raise InvalidAudioError(
            f"cannot decode audio file {path} ({err}): pass a WAV, FLAC, MP3 or Ogg file"
        ) from err
    _check_file_sample_rate(path, int(sample_rate))
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.size == 0:
        raise InvalidAudioError(f"audio file {path} holds no samples (only a header): record again")
    if mono:
        pcm = pcm.mean(axis=0) if pcm.shape[0] > 1 else pcm[0]
    return np.ascontiguousarray(pcm), int(sample_rate)


def read_voice_wav(path: str | Path) -> np.ndarray:
    """A recording to speak in the voice of, checked and resampled: float32 mono at 24 kHz.

    Refused at once (before any resampling or encoding): an unreadable or empty file, NaN or
    infinite samples, or one longer than MAX_VOICE_SECONDS. Errors name the voice file.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidAudioError(f"voice recording {path} does not exist: check the path")
    pcm, sample_rate = read_wav(path)
    seconds = pcm.size / sample_rate
    if seconds > MAX_VOICE_SECONDS:
        raise InvalidAudioError(
            f"voice recording {path} lasts {seconds:.1f} s; a voice prompt may last at most "
            f"{MAX_VOICE_SECONDS:.0f} s: cut a short clip (about 10 s) of the speaker"
        )
    if not np.all(np.isfinite(pcm)):
        raise InvalidAudioError(
            f"voice recording {path} contains NaN or infinite samples: export it again"
        )
    return resample(pcm, sample_rate, SAMPLE_RATE)


def _wav_header_sample_rate(path: Path) -> int | None:
    """The sample rate a RIFF/WAVE file's `fmt ` chunk declares, or None for other files."""
    with open(path, "rb") as file:
        head = file.read(65_536)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= len(head):
        chunk_id, size = head[offset : offset + 4], int.from_bytes(head[offset + 4 : offset + 8], "little")
        if chunk_id == b"fmt " and offset + 16 <= len(head):
            return int.from_bytes(head[offset + 12 : offset + 16], "little")
        offset += 8 + size + (size & 1)  # chunks are padded to an even size
    return None


def _check_file_sample_rate(path: Path, sample_rate: int) -> None:
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidAudioError(
            f"audio file {path} says its sample rate is {sample_rate} Hz, outside "
            f"{MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz: the file is damaged or not a recording"
        )


def write_wav(path: str | Path, pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono float PCM (values in [-1, 1]) as a 16-bit WAV file; creates parent folders."""
    pcm = np.asarray(pcm, dtype=np.float32)
    if pcm.ndim == 2 and pcm.shape[0] == 1:
        pcm = pcm[0]
    if pcm.ndim != 1:
        raise InvalidAudioError(
            f"write_wav needs mono audio of shape [samples], got shape {tuple(pcm.shape)}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The standard library's writer, not sphn's: sphn loses write errors of short files (a
    # full disk would leave a truncated file and no error).
    samples = np.round(np.clip(pcm, -1.0, 1.0) * 32767.0).astype("<i2")
    try:
        with wave.open(str(path), "wb") as file:
            file.setnchannels(1)
            file.setsampwidth(2)
            file.setframerate(int(sample_rate))
            file.writeframes(samples.tobytes())
    except OSError as err:
        raise OSError(f"cannot write audio file {path} ({err.strerror or err}): free some space or choose another place") from err


def resample(pcm: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Resample mono float PCM; the output has exactly ceil(len * dst / src) samples.

    We use a polyphase filter rather than `sphn.resample`: sphn's streaming resampler
    delays the signal by a few hundred samples and pads the end to its chunk size, which
    would shift the user's speech against the model's frames.
    """
    pcm = np.asarray(pcm, dtype=np.float32)
    if src_rate == dst_rate:
        return pcm.copy()
    import scipy.signal  # takes over a second to import: only when resampling

    ratio = Fraction(int(dst_rate), int(src_rate))
    resampled = scipy.signal.resample_poly(pcm, ratio.numerator, ratio.denominator, axis=-1)
    return np.ascontiguousarray(resampled, dtype=np.float32)


class StreamingResampler:
    """Resample a stream block by block, with filter state carried between blocks.

    Resampling each microphone block on its own would filter every block edge as if the
    signal stopped there. This is a polyphase FIR (upsample by `up`, low-pass, keep every
    `down`-th sample) whose tail and phase survive from one block to the next, so blocks of
    any size give the same samples as the whole stream. It is causal: the output lags by
    half the filter (under 1 ms).
    """

    def __init__(self, src_rate: int, dst_rate: int, taps_per_phase: int = 16):
        import scipy.signal

        ratio = Fraction(int(dst_rate), int(src_rate))
        self.up, self.down = ratio.numerator, ratio.denominator
        cutoff = 1.0 / max(self.up, self.down)  # Nyquist of the lower of the two rates
        self._taps = (self.up * scipy.signal.firwin(taps_per_phase * self.up, cutoff)).astype(np.float64)
        self._state = np.zeros(len(self._taps) - 1)
        self._phase = 0  # index, in the upsampled stream, of the next sample to keep

    def process(self, pcm: np.ndarray) -> np.ndarray:
        import scipy.signal

        upsampled = np.zeros(len(pcm) * self.up)
        upsampled[:: self.up] = pcm
        filtered, self._state = scipy.signal.lfilter(self._taps, [1.0], upsampled, zi=self._state)
        kept = filtered[self._phase :: self.down]
        self._phase = (self._phase - len(upsampled)) % self.down
        return kept.astype(np.float32)


async def model_rate_frames(
    blocks: AsyncIterator[Any], sample_rate: int, frame_samples: int = FRAME_SAMPLES
) -> AsyncIterator[np.ndarray]:
    """Microphone blocks of any size -> whole 24 kHz frames of `frame_samples`, the last one
    zero-padded. Each block is checked (a real mono array, finite); the stream is resampled as
    one signal."""
    check_sample_rate(sample_rate)
    resampler = StreamingResampler(sample_rate, SAMPLE_RATE) if sample_rate != SAMPLE_RATE else None
    pending = np.zeros(0, dtype=np.float32)
    async for block in blocks:
        if not np.size(block):
            continue
        # Checked as if already at 24 kHz (so not resampled there): the stream resampler follows.
        pcm = prepare_user_audio(block, SAMPLE_RATE, max_seconds=float("inf"))
        pending = np.concatenate([pending, resampler.process(pcm) if resampler is not None else pcm])
        while pending.shape[0] >= frame_samples:
            yield pending[:frame_samples]
            pending = pending[frame_samples:]
    if pending.shape[0]:
        yield np.pad(pending, (0, frame_samples - pending.shape[0]))


def normalize_loudness(
    pcm: np.ndarray, sample_rate: int, target_lufs: float = VOICE_PROMPT_LUFS
) -> np.ndarray:
    """Scale mono PCM to an integrated loudness of `target_lufs` (ITU-R BS.1770).

    The reference normalises voice-prompt WAVs to -24 LUFS before encoding them. Audio too
    short to measure (under one 400 ms gating block) or silent has no defined loudness:
    it is returned unchanged rather than scaled by an infinite gain.
    """
    import pyloudnorm  # imports scipy.signal, slow: only when normalising

    pcm = np.asarray(pcm, dtype=np.float32)
    meter = pyloudnorm.Meter(sample_rate)
    if pcm.shape[-1] < meter.block_size * sample_rate:
        return pcm.copy()
    loudness = meter.integrated_loudness(pcm.astype(np.float64))
    if not math.isfinite(loudness):
        return pcm.copy()
    gain = 10.0 ** ((target_lufs - loudness) / 20.0)
    return (pcm * gain).astype(np.float32)


def prepare_user_audio(
    audio: Any, sample_rate: int = SAMPLE_RATE, *, max_seconds: float = MAX_SECONDS
) -> np.ndarray:
    """Validate user audio and return it as contiguous float32 mono PCM at 24 kHz.

    Accepts a numpy array, a torch tensor or a list of floats, shaped [T], [1, T] or [T, 1].
    int16/int32 PCM is scaled to [-1, 1]. Anything else raises InvalidAudioError.
    """
    check_sample_rate(sample_rate)
    pcm = _to_float_array(audio)
    pcm = _to_mono(pcm)
    if pcm.size == 0:
        raise InvalidAudioError("the audio is empty: pass at least one sample")
    if not np.all(np.isfinite(pcm)):
        raise InvalidAudioError(
            "the audio contains NaN or infinite samples: clean it (e.g. np.nan_to_num) first"
        )
    seconds = pcm.size / sample_rate
    if seconds > max_seconds:
        raise InvalidAudioError(
            f"the audio lasts {seconds:.1f} s, longer than the {max_seconds:.0f} s the model "
            "can keep in context: split it into shorter pieces"
        )
    return np.ascontiguousarray(resample(pcm, sample_rate, SAMPLE_RATE), dtype=np.float32)


def check_sample_rate(sample_rate: Any) -> None:
    is_integer = isinstance(sample_rate, (int, np.integer)) and not isinstance(sample_rate, bool)
    if not is_integer or sample_rate <= 0:
        raise InvalidAudioError(
            f"sample_rate must be a positive integer number of Hz (e.g. 24000), got {sample_rate!r}"
        )
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidAudioError(
            f"sample_rate {sample_rate} Hz is outside {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz: "
            "pass the rate the audio was recorded at (e.g. 16000 or 48000)"
        )


def _to_float_array(audio: Any) -> np.ndarray:
    """Turn any accepted container into a float32 numpy array, scaling integer PCM."""
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu()
        # numpy has no bfloat16: widen floating tensors before converting.
        audio = audio.float().numpy() if audio.is_floating_point() else audio.numpy()
    elif isinstance(audio, (list, tuple)):
        try:
            audio = np.asarray(audio, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise InvalidAudioError(
                f"a list of audio samples must hold only numbers ({err})"
            ) from err
    elif not isinstance(audio, np.ndarray):
        raise InvalidAudioError(
            f"audio must be a numpy array, a torch tensor or a list of floats, "
            f"got {type(audio).__name__}"
        )
    if audio.dtype in _INT_FULL_SCALE:
        return audio.astype(np.float32) / _INT_FULL_SCALE[audio.dtype]
    if not np.issubdtype(audio.dtype, np.floating):
        raise InvalidAudioError(
            f"audio samples must be float (or int16/int32 PCM), got dtype {audio.dtype}"
        )
    return audio.astype(np.float32, copy=False)


def _to_mono(pcm: np.ndarray) -> np.ndarray:
    """Accept [T], [1, T] and [T, 1]; refuse anything with several channels."""
    if pcm.ndim == 1:
        return pcm
    if pcm.ndim == 2 and 1 in pcm.shape:
        return pcm.reshape(-1)
    if pcm.ndim == 2:
        channels = min(pcm.shape)
        axis = int(np.argmin(pcm.shape))
        raise InvalidAudioError(
            f"the audio has {channels} channels (shape {tuple(pcm.shape)}); the model takes "
            f"mono: downmix it first, e.g. audio.mean(axis={axis})"
        )
    raise InvalidAudioError(
        f"audio must be 1-D mono samples (shape [T] or [1, T]), got shape {tuple(pcm.shape)}"
    )
