"""Voice activity detection with Silero VAD: where speech is, and when an utterance ends.

We run the ONNX model that the `silero-vad` PyPI package ships, with onnxruntime, and
locate it without importing that package: importing `silero_vad` calls
`torch.set_num_threads(1)`, which would slow the whole engine in the same process.

The model takes 16 kHz windows of 512 samples (32 ms) plus the previous window's last
64 samples as context, and carries a recurrent state between windows. Our audio is 24 kHz,
so each 768-sample block is resampled to exactly one window by the stream resampler of
`audio.io` (2 up, 3 down), which keeps its state between blocks so no block edges are heard.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The stream resampler imports scipy.signal when first built, which takes a second or more:
# done here, with the server's imports, rather than when a conversation's first audio
# arrives (audio that arrives meanwhile would be late for the utterance detector).
import scipy.signal  # noqa: F401

from personaplex.audio.format import SAMPLE_RATE
from personaplex.audio.io import StreamingResampler
from personaplex.errors import PersonaPlexError

VAD_SAMPLE_RATE = 16_000
WINDOW_SAMPLES = 768  # at 24 kHz: 32 ms, one 512-sample model window at 16 kHz
WINDOW_SECONDS = WINDOW_SAMPLES / SAMPLE_RATE
_MODEL_WINDOW = 512
_MODEL_CONTEXT = 64
_STATE_SHAPE = (2, 1, 128)

# Silero's own defaults: speech starts above 0.5 and lasts while above 0.35.
SPEECH_THRESHOLD = 0.5
SILENCE_THRESHOLD = 0.35


def bundled_model_path() -> Path:
    """The Silero VAD ONNX file inside the installed `silero-vad` package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or spec.origin is None:
        raise PersonaPlexError(
            "voice activity detection needs the silero-vad package: pip install 'personaplex[server]'"
        )
    path = Path(spec.origin).parent / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise PersonaPlexError(f"the silero-vad package has no model file at {path}: reinstall it")
    return path


class SileroVad:
    """Speech probability of consecutive 32 ms windows of one 24 kHz stream."""

    def __init__(self, model_path: str | Path | None = None) -> None:
        import onnxruntime  # imported here: only the server and tests need it

        options = onnxruntime.SessionOptions()
        # The model is tiny: one thread each keeps it from competing with the engine.
        options.inter_op_num_threads = 1
        options.intra_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            str(model_path or bundled_model_path()),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        self.reset()

    def reset(self) -> None:
        """Forget the stream so far (start a new, independent stream)."""
        self._state = np.zeros(_STATE_SHAPE, dtype=np.float32)
        self._context = np.zeros(_MODEL_CONTEXT, dtype=np.float32)
        self._resampler = StreamingResampler(SAMPLE_RATE, VAD_SAMPLE_RATE, taps_per_phase=48)

    def window_probability(self, block: np.ndarray) -> float:
        """Speech probability of the next WINDOW_SAMPLES samples of the 24 kHz stream."""
        if len(block) != WINDOW_SAMPLES:
            raise ValueError(f"a VAD window is {WINDOW_SAMPLES} samples, got {len(block)}")
        window = self._resampler.process(np.asarray(block, dtype=np.float32))
        model_input = np.concatenate([self._context, window])[None, :]
        probability, self._state = self._session.run(
            None,
            {
                "input": model_input,
                "state": self._state,
                "sr": np.array(VAD_SAMPLE_RATE, dtype=np.int64),
            },
        )
        self._context = model_input[0, -_MODEL_CONTEXT:]
        return float(probability[0, 0])


@dataclass(frozen=True)
class SpeechStarted:
    """The user started speaking (used to interrupt a reply that is playing)."""


@dataclass(frozen=True)
class UtteranceEnded:
    """The user stopped speaking: `audio` is the whole utterance at 24 kHz."""

    audio: np.ndarray


VadEvent = SpeechStarted | UtteranceEnded


class UtteranceDetector:
    """Cuts a live 24 kHz microphone stream into utterances.

    An utterance starts when speech lasts `min_speech_s`, and ends after `end_silence_s`
    of silence (or at `max_utterance_s`). Its audio starts `pre_roll_s` before the speech
    was detected (the first syllable rises before the model is sure) and ends
    `tail_s` after the last speech window.
    """

    def __init__(
        self,
        vad: SileroVad | None = None,
        *,
        end_silence_s: float = 1.0,
        min_speech_s: float = 0.1,
        pre_roll_s: float = 0.5,
        tail_s: float = 0.2,
        max_utterance_s: float = 30.0,
    ) -> None:
        self._vad = vad or SileroVad()
        self._end_silence_windows = max(1, round(end_silence_s / WINDOW_SECONDS))
        self._min_speech_windows = max(1, round(min_speech_s / WINDOW_SECONDS))
        self._pre_roll_windows = math.ceil(pre_roll_s / WINDOW_SECONDS)
        self._tail_samples = int(tail_s * SAMPLE_RATE)
        self._max_samples = int(max_utterance_s * SAMPLE_RATE)
        self.reset()

    def reset(self) -> None:
        """Drop any partial utterance and start listening afresh."""
        self._vad.reset()
        self._unprocessed = np.zeros(0, dtype=np.float32)
        self._recent: list[np.ndarray] = []  # windows kept for the pre-roll or the utterance
        self._in_utterance = False
        self._speech_run = 0
        self._silence_run = 0

    @property
    def in_utterance(self) -> bool:
        """Whether the user is speaking now (an utterance has started and not ended)."""
        return self._in_utterance

    def feed(self, pcm: np.ndarray) -> list[VadEvent]:
        """Process more microphone audio; returns what happened in it, in order."""
        self._unprocessed = np.concatenate([self._unprocessed, np.asarray(pcm, dtype=np.float32)])
        events: list[VadEvent] = []
        while len(self._unprocessed) >= WINDOW_SAMPLES:
            window = self._unprocessed[:WINDOW_SAMPLES]
            self._unprocessed = self._unprocessed[WINDOW_SAMPLES:]
            event = self._process_window(window)
            if event is not None:
                events.append(event)
        return events

    def end_now(self) -> UtteranceEnded | None:
        """End the current utterance at once, without waiting for the silence.

        For a client that knows the turn is over (a push-to-talk key). Returns None when
        the user is not speaking.
        """
        if not self._in_utterance:
            return None
        audio = self._collected_audio()
        self.reset()
        return UtteranceEnded(audio)

    def _process_window(self, window: np.ndarray) -> VadEvent | None:
        probability = self._vad.window_probability(window)
        self._recent.append(window)
        if not self._in_utterance:
            return self._while_waiting(probability)
        return self._while_speaking(probability)

    def _while_waiting(self, probability: float) -> VadEvent | None:
        self._speech_run = self._speech_run + 1 if probability >= SPEECH_THRESHOLD else 0
        if self._speech_run < self._min_speech_windows:
            keep = self._speech_run + self._pre_roll_windows
            self._recent = self._recent[max(0, len(self._recent) - keep) :]
            return None
        self._in_utterance = True
        self._silence_run = 0
        return SpeechStarted()

    def _while_speaking(self, probability: float) -> VadEvent | None:
        self._silence_run = 0 if probability >= SILENCE_THRESHOLD else self._silence_run + 1
        too_long = len(self._recent) * WINDOW_SAMPLES >= self._max_samples
        if self._silence_run < self._end_silence_windows and not too_long:
            return None
        trailing_silence = self._silence_run * WINDOW_SAMPLES
        audio = self._collected_audio()
        audio = audio[: len(audio) - max(0, trailing_silence - self._tail_samples)]
        self._in_utterance = False
        self._recent = []
        self._speech_run = 0
        self._silence_run = 0
        return UtteranceEnded(audio)

    def _collected_audio(self) -> np.ndarray:
        if not self._recent:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._recent)
