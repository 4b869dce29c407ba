"""A small deterministic stand-in for personaplex.PersonaPlex, for server tests only.

Same call signatures as the real engine. Each reply frame is a sine tone whose pitch
depends on the voice, and its text pieces name the voice, so a test can tell which
conversation a message belongs to.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from personaplex.errors import UnknownVoiceError
from personaplex.runtime.prompts import DEFAULT_PROMPT
from personaplex.runtime.sampling import SamplingConfig
from personaplex.runtime.voices import VOICE_NAMES

SAMPLE_RATE = 24_000
FRAME = 1_920


@dataclass(frozen=True)
class FakeChunk:
    pcm: np.ndarray
    text: str
    frame_index: int
    elapsed_ms: float


def voice_pitch(voice: str) -> float:
    return 200.0 + 20.0 * VOICE_NAMES.index(voice)


def tone(voice: str, frame_index: int) -> np.ndarray:
    t = (np.arange(FRAME) + frame_index * FRAME) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * voice_pitch(voice) * t)).astype(np.float32)


class WordTokenizer:
    """One piece per word: what the server's system prompt bound needs of a tokenizer."""

    def encode(self, text: str) -> list[int]:
        return [1] * len(text.split())


class FakeEngine:
    sample_rate = SAMPLE_RATE
    frame_samples = FRAME
    tokenizer = WordTokenizer()
    lm = SimpleNamespace(config=SimpleNamespace(context=3000))  # the real model's context

    def __init__(
        self, frame_seconds: float = 0.0, persona_seconds: float = 0.0, fail_at_frame: int | None = None
    ) -> None:
        self.frame_seconds = frame_seconds  # simulated compute time per frame
        self.persona_seconds = persona_seconds  # simulated persona prefill before the first frame
        self.fail_at_frame = fail_at_frame  # full duplex: raise a RuntimeError instead of this frame
        self.realtime_calls: list[dict] = []
        self._lock = threading.Lock()
        self.running = 0  # generations in progress now
        self.stream_calls: list[dict] = []
        self.realtime_input_peaks: list[float] = []  # loudness of each microphone frame received

    def frame_stats(self) -> dict[str, float | int]:
        return {"frames_run": 0, "late_frames": 0, "live_rows": self.running, "capacity": 0}

    def _started(self) -> None:
        with self._lock:
            self.running += 1

    def _ended(self) -> None:
        with self._lock:
            self.running -= 1

    def respond_stream(
        self,
        audio: np.ndarray,
        *,
        sample_rate: int = SAMPLE_RATE,
        voice: str = "NATM0",
        system_prompt: str = DEFAULT_PROMPT,
        max_steps: int = 75,
        seed: int | None = None,
        greedy: bool = False,
        sampling: SamplingConfig | None = None,
    ) -> Iterator[FakeChunk]:
        if voice not in VOICE_NAMES:
            raise UnknownVoiceError(f"unknown voice {voice!r}")
        self.stream_calls.append(
            {"samples": len(audio), "voice": voice, "system_prompt": system_prompt, "max_steps": max_steps}
        )
        return self._stream(voice, max_steps)

    def _stream(self, voice: str, max_steps: int) -> Iterator[FakeChunk]:
        self._started()
        try:
            for index in range(max_steps):
                started = time.perf_counter()
                time.sleep(self.frame_seconds)
                text = f" {voice}" if index % 10 == 0 else ""
                yield FakeChunk(tone(voice, index), text, index, (time.perf_counter() - started) * 1000)
        finally:
            self._ended()

    async def respond_realtime(
        self,
        mic_frames: AsyncIterator[np.ndarray],
        *,
        voice: str = "NATM0",
        system_prompt: str = DEFAULT_PROMPT,
        seed: int | None = None,
        greedy: bool = False,
        sampling: SamplingConfig | None = None,
    ) -> AsyncIterator[FakeChunk]:
        if voice not in VOICE_NAMES:
            raise UnknownVoiceError(f"unknown voice {voice!r}")
        self.realtime_calls.append({"voice": voice, "system_prompt": system_prompt, "sampling": sampling})
        await asyncio.sleep(self.persona_seconds)
        self._started()
        try:
            index = 0
            async for frame in mic_frames:
                if index == self.fail_at_frame:
                    raise RuntimeError("simulated engine failure")
                assert len(frame) == FRAME
                self.realtime_input_peaks.append(float(np.abs(frame).max()))
                started = time.perf_counter()
                await asyncio.sleep(self.frame_seconds)
                text = f" {voice}" if index % 5 == 0 else ""
                yield FakeChunk(tone(voice, index), text, index, (time.perf_counter() - started) * 1000)
                index += 1
        finally:
            self._ended()
