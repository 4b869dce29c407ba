"""Silero VAD on espeak-ng speech: where the speech is, and when an utterance ends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from personaplex.audio.vad import (
    SileroVad,
    SpeechStarted,
    UtteranceDetector,
    UtteranceEnded,
    WINDOW_SAMPLES,
    bundled_model_path,
)
from tests.server.harness import silence, speak

RATE = 24_000


@pytest.fixture(scope="module")
def sentence(tmp_path_factory) -> np.ndarray:
    return speak("The quick brown fox jumps over the lazy dog.", tmp_path_factory.mktemp("vad"))


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


def speech_windows(vad: SileroVad, audio: np.ndarray) -> list[int]:
    """Indices of the 32 ms windows whose speech probability passes Silero's threshold."""
    vad.reset()
    whole = len(audio) // WINDOW_SAMPLES
    return [i for i in range(whole)
            if vad.window_probability(audio[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES]) >= 0.5]


def test_model_comes_from_the_package_without_changing_torch_threads():
    threads = torch.get_num_threads()
    assert bundled_model_path().name == "silero_vad.onnx"
    SileroVad()
    # Importing the silero_vad package would have called torch.set_num_threads(1).
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("lead_s, tail_s", [(1.5, 2.0), (0.7, 1.2)])
def test_finds_the_spoken_part_within_100_ms(sentence, vad, lead_s, tail_s):
    audio = np.concatenate([silence(lead_s), sentence, silence(tail_s)])
    windows = speech_windows(vad, audio)
    window_s = WINDOW_SAMPLES / RATE
    speech_end = lead_s + len(sentence) / RATE
    assert abs(windows[0] * window_s - lead_s) <= 0.1
    assert abs((windows[-1] + 1) * window_s - speech_end) <= 0.1


def test_silence_and_faint_noise_are_not_speech(vad):
    noise = np.random.default_rng(0).normal(0, 0.003, 3 * RATE).astype(np.float32)
    assert speech_windows(vad, silence(2.0)) == []
    assert speech_windows(vad, noise) == []


def test_utterance_ends_after_about_a_second_of_silence(sentence, vad):
    detector = UtteranceDetector(vad, end_silence_s=1.0)
    audio = np.concatenate([silence(1.0), sentence, silence(2.0)])
    timeline = []
    for start in range(0, len(audio), 480):  # 20 ms blocks, as a microphone delivers them
        for event in detector.feed(audio[start : start + 480]):
            timeline.append((start / RATE, event))
    kinds = [type(event) for _, event in timeline]
    assert kinds == [SpeechStarted, UtteranceEnded]
    speech_end = 1.0 + len(sentence) / RATE
    started_at, ended_at = timeline[0][0], timeline[1][0]
    assert 1.0 <= started_at <= 1.3
    assert speech_end + 0.9 <= ended_at <= speech_end + 1.3
    utterance = timeline[1][1].audio
    # The whole sentence, with a short pre-roll and tail, not the second of silence.
    assert len(sentence) <= len(utterance) <= len(sentence) + 0.8 * RATE
    assert not detector.in_utterance


def test_end_now_cuts_the_current_utterance(sentence, vad):
    detector = UtteranceDetector(vad)
    assert detector.end_now() is None  # nobody is speaking
    events = detector.feed(np.concatenate([silence(0.5), sentence[:RATE]]))
    assert any(isinstance(event, SpeechStarted) for event in events)
    ended = detector.end_now()
    assert isinstance(ended, UtteranceEnded) and len(ended.audio) >= 0.8 * RATE
    assert not detector.in_utterance
