"""Speech recognition of the user's turn with faster-whisper, to show their words.

PersonaPlex itself hears audio, not text: the transcript is only for the user to read.
faster-whisper (Whisper on CTranslate2) runs well on a CPU beside the engine, and its
models are either a name fetched from the Hugging Face hub ("base.en", "small", ...) or
a local folder in CTranslate2 format.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from personaplex.audio.io import resample
from personaplex.errors import ModelUnavailableError

WHISPER_SAMPLE_RATE = 16_000
DEFAULT_ASR_MODEL = "base.en"
# PersonaPlex converses in English; fixing the language also skips Whisper's detection pass.
DEFAULT_LANGUAGE = "en"


class Transcriber:
    """A loaded Whisper model; `transcribe` may be called from several threads."""

    def __init__(
        self,
        model: str | Path = DEFAULT_ASR_MODEL,
        *,
        device: str = "cpu",
        compute_type: str = "int8",
        language: str | None = DEFAULT_LANGUAGE,
        local_files_only: bool = False,
    ) -> None:
        from faster_whisper import WhisperModel  # heavy import, needed only for turn-based chat

        self.model_name = str(model)
        self._language = language
        if not is_model_name(self.model_name) and not Path(self.model_name).expanduser().is_dir():
            raise ModelUnavailableError(
                f"the speech recognition model folder {self.model_name} does not exist: pass "
                "--asr-model with a CTranslate2 Whisper folder, a model name (tiny.en, base.en, ...) "
                "or 'none'"
            )
        # One transcription at a time: CTranslate2 already uses every core for one.
        self._lock = threading.Lock()
        try:
            self._model = WhisperModel(
                self.model_name, device=device, compute_type=compute_type, local_files_only=local_files_only
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise ModelUnavailableError(
                f"the speech recognition model {self.model_name!r} cannot be loaded ({err}). "
                "Pass --asr-model with a Whisper model name that can be downloaded "
                "(tiny.en, base.en, small.en, ...), a local CTranslate2 Whisper folder, "
                "or 'none' to chat without transcripts."
            ) from err

    def transcribe(self, pcm: np.ndarray, sample_rate: int = 24_000) -> str:
        """The words spoken in mono float `pcm` (empty string for silence)."""
        audio = resample(np.asarray(pcm, dtype=np.float32), sample_rate, WHISPER_SAMPLE_RATE)
        if len(audio) == 0:
            return ""
        with self._lock:
            segments, _info = self._model.transcribe(
                audio,
                language=self._language,
                beam_size=1,
                # Our own VAD already cut the utterance; Whisper's would cut it again.
                vad_filter=False,
                condition_on_previous_text=False,
            )
            return " ".join(segment.text.strip() for segment in segments).strip()


def is_model_name(model: str) -> bool:
    """True for a model the hub serves ("base.en", "owner/repo"); False for a folder path."""
    return not (model.startswith(("/", ".", "~")) or model.count("/") > 1 or Path(model).expanduser().is_dir())
