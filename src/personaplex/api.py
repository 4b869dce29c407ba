"""The library: load PersonaPlex once, then talk to it with four calls.

    engine = PersonaPlex.from_pretrained()              # or a local folder
    reply = engine.respond(user_pcm, sample_rate=16000)  # turn-based
    for chunk in engine.respond_stream(user_pcm): ...    # the same, chunk by chunk
    async for chunk in engine.respond_realtime(mic): ... # full duplex, lock-step
    audio, info = engine.respond_diagnostic(user_pcm)    # with hidden-state statistics
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .audio.io import SAMPLE_RATE, model_rate_frames, normalize_loudness, prepare_user_audio, read_wav, resample
from .errors import PersonaPlexError, UnknownVoiceError
from .hub import MLX_MIMI_FILENAME, find_voices_dir, is_mlx_folder, resolve_model_folder
from .model.config import ModelConfig
from .model.lm import LMModel
from .model.lm_checkpoint import LM_FILENAME, load_lm
from .model.mimi import MIMI_FILENAME, Mimi, load_mimi
from .runtime.batching import LockstepBatcher
from .runtime.conversation import Conversation, FrameResult, monologue_piece
from .runtime.diagnostics import DiagnosticInfo, DiagnosticRecorder
from .runtime.generation import FrameGenerator
from .runtime.persona import PersonaSnapshot, build_script, prefill_batched
from .runtime.prompts import DEFAULT_PROMPT, wrap_system_prompt
from .runtime.sampling import SamplingConfig
from .runtime.voices import DEFAULT_VOICE, VoicePrompt, is_wav_voice, load_voice
from .text.tokenizer import TEXT_TOKENIZER_FILENAME, TextTokenizer

WEIGHT_FORMATS = ("bf16", "fp8", "int4")
SILENT_FRAME_RMS = 1e-3  # -60 dBFS: quieter agent frames count as silence for early stopping


@dataclass
class LoadProgress:
    stage: str  # "download" | "load" | "warmup" | "ready"
    fraction: float | None
    message: str
    elapsed_s: float


@dataclass
class AudioChunk:
    pcm: np.ndarray  # [1920] float32, 24 kHz
    text: str  # inner-monologue piece of this frame ("" for padding)
    frame_index: int
    elapsed_ms: float  # compute time of this frame
    text_token: int = 0
    agent_codes: list[int] = field(default_factory=list)  # the 8 Mimi codes decoded into `pcm`


@dataclass
class FrameOutput:
    index: int
    text: str
    text_token: int
    agent_codes: list[int]


@dataclass
class Response:
    audio: np.ndarray  # float32, 24 kHz
    text_tokens: list[int]
    text: str
    frames: list[FrameOutput] = field(default_factory=list)


class ChunkStream:
    """Chunks of a reply as they are made: iterate it, or `async for` over it (each frame is
    computed in a worker thread so the event loop never blocks)."""

    def __init__(self, frames: Iterator[AudioChunk]):
        self._frames = frames

    def __iter__(self) -> Iterator[AudioChunk]:
        return self._frames

    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        return self._async_frames()

    async def _async_frames(self) -> AsyncIterator[AudioChunk]:
        done = object()
        try:
            while (chunk := await asyncio.to_thread(next, self._frames, done)) is not done:
                yield chunk
        finally:
            self._frames.close()

    def close(self) -> None:
        self._frames.close()


class PersonaPlex:
    """A loaded model (LM + Mimi + tokenizer + voices) serving any number of conversations."""

    sample_rate = SAMPLE_RATE

    def __init__(self, lm: LMModel, mimi: Mimi, tokenizer: TextTokenizer, voices_dir: Path | None,
                 weights: str = "bf16", persona_cache_size: int = 8):
        self.lm, self.mimi, self.tokenizer = lm, mimi, tokenizer
        self.voices_dir = voices_dir
        self.weights = weights
        self.device = lm.text_linear.weight.device
        self.compute_lock = threading.Lock()
        self._personas: OrderedDict[tuple, PersonaSnapshot] = OrderedDict()
        self._persona_cache_size = persona_cache_size
        self._batcher: LockstepBatcher | None = None

    @property
    def frame_samples(self) -> int:
        return self.mimi.config.frame_samples

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        weights: str = "bf16",
        progress: Callable[[LoadProgress], None] | None = None,
    ) -> "PersonaPlex":
        """Load from a local folder or a Hugging Face repo id (default `nvidia/personaplex-7b-v1`).

        `device` defaults to CUDA when available; `dtype` to bf16 on CUDA and float32 on CPU.
        `weights` picks the LM's linear-layer format: bf16 (as stored), fp8 or int4.
        """
        if weights not in WEIGHT_FORMATS:
            raise PersonaPlexError(f"unknown weights format {weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
        started = time.perf_counter()

        def report(stage: str, fraction: float | None, message: str) -> None:
            if progress is not None:
                progress(LoadProgress(stage, fraction, message, time.perf_counter() - started))

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        report("download", None, f"locating model files for {source or 'the default repo'}")
        folder = resolve_model_folder(source)
        config = ModelConfig.from_folder(folder)
        report("load", 0.0, f"loading the language model from {folder}")
        mlx = is_mlx_folder(folder)
        if mlx:  # already quantized (4 or 8 bits): used as stored
            from .model.mlx import load_mlx_lm

            lm = load_mlx_lm(folder, config.lm, device=device, dtype=dtype)
        else:
            lm = load_lm(folder / LM_FILENAME, config.lm, device=device, dtype=dtype,
                         depformer_steps=config.lm.agent_codebooks)
        if weights != "bf16" and not mlx:
            from .model.quantize import quantize_model

            report("load", 0.6, f"quantizing the language model to {weights}")
            quantize_model(lm, weights)
        report("load", 0.8, "loading the Mimi codec")
        mimi_file = folder / (MLX_MIMI_FILENAME if mlx else MIMI_FILENAME)
        mimi = load_mimi(mimi_file, config.mimi, device=device, dtype=torch.float32)
        tokenizer = TextTokenizer(folder / TEXT_TOKENIZER_FILENAME)
        engine = cls(lm, mimi, tokenizer, find_voices_dir(folder), weights=weights)
        report("warmup", 0.0, "warming up (default persona + one frame)")
        engine.warmup()
        report("ready", 1.0, f"ready on {device} in {time.perf_counter() - started:.1f} s")
        return engine

    def warmup(self) -> None:
        """Prefill the default persona and run one frame, so the first conversation starts fast."""
        if self.voices_dir is None:
            return
        conversation = self.conversation()
        conversation.step(np.zeros(self.frame_samples, dtype=np.float32))

    # ------------------------------------------------------------------ personas

    def persona(self, voice: str = DEFAULT_VOICE, system_prompt: str = DEFAULT_PROMPT) -> PersonaSnapshot:
        """The prefilled state for (voice, prompt), computed once and cached."""
        if not isinstance(system_prompt, str):
            raise PersonaPlexError(f"system_prompt must be a string, got {type(system_prompt).__name__}")
        if not isinstance(voice, (str, Path)):
            raise UnknownVoiceError(f"voice must be a preset name or a file path, got {type(voice).__name__}")
        # A WAV voice is keyed by its modification time too, so an edited file is prefilled anew.
        wav_version = Path(voice).stat().st_mtime_ns if is_wav_voice(voice) and Path(voice).is_file() else None
        key = (str(voice), wav_version, system_prompt)
        prompt_tokens = self.tokenizer.encode(wrap_system_prompt(system_prompt)) if system_prompt.strip() else []
        # Under the compute lock: conversations in other threads share the cache and the model.
        with self.compute_lock, torch.no_grad():
            if key in self._personas:
                self._personas.move_to_end(key)
                return self._personas[key]
            if is_wav_voice(voice):
                script = build_script(self.lm, prompt_tokens, voice_codes=self._encode_voice_wav(Path(voice)))
            else:
                script = build_script(self.lm, prompt_tokens, voice=self._preset(voice))
            generator = FrameGenerator(self.lm, 1, agent_only=True)
            prefill_batched(generator, script)
            snapshot = PersonaSnapshot.capture(generator)
            self._personas[key] = snapshot
            while len(self._personas) > self._persona_cache_size:
                self._personas.popitem(last=False)
        return snapshot

    def _preset(self, voice: str | Path) -> VoicePrompt:
        return load_voice(voice, self.voices_dir, dim=self.lm.config.dim, num_codebooks=self.lm.config.num_codebooks)

    def _encode_voice_wav(self, path: Path) -> torch.Tensor:
        """A WAV voice prompt as the reference prepares it: -24 LUFS, 24 kHz, Mimi codes [8, N]."""
        if not path.is_file():
            raise UnknownVoiceError(f"voice file {path} does not exist")
        pcm, rate = read_wav(path)
        pcm = normalize_loudness(resample(pcm, rate, SAMPLE_RATE), SAMPLE_RATE)
        state = self.mimi.init_stream(1)
        codes = [self.mimi.encode_step(torch.from_numpy(frame).to(self.device).view(1, 1, -1), state)[0, :, 0]
                 for frame in _frames_of(pcm, self.frame_samples)]
        return torch.stack(codes, dim=1)

    def conversation(self, voice: str = DEFAULT_VOICE, system_prompt: str = DEFAULT_PROMPT, seed: int | None = None,
                     greedy: bool = False, sampling: SamplingConfig | None = None) -> Conversation:
        """A new conversation, starting right after the (cached) persona."""
        persona = self.persona(voice, system_prompt)
        sampling = sampling or SamplingConfig(greedy=greedy)
        return Conversation(self.lm, self.mimi, self.tokenizer, persona, sampling, seed, self.compute_lock)

    def enable_batching(self, max_sessions: int, kv_dtype: torch.dtype | None = None, max_wait_s: float = 0.08) -> None:
        """Run `respond_realtime` conversations together, up to `max_sessions` rows of one batched
        frame (one CUDA graph on a GPU), instead of one after another. Each row samples from its
        own seeded stream, so a seed gives the same conversation batched or alone."""
        self._batcher = LockstepBatcher(self, max_sessions, kv_dtype=kv_dtype, max_wait_s=max_wait_s)

    @property
    def batcher(self) -> LockstepBatcher | None:
        return self._batcher

    # ------------------------------------------------------------------ the four calls

    def respond_stream(self, audio: Any, *, sample_rate: int = SAMPLE_RATE, voice: str = DEFAULT_VOICE,
                       voice_wav: str | None = None, system_prompt: str = DEFAULT_PROMPT, max_steps: int = 75,
                       seed: int | None = None, greedy: bool = False,
                       stop_after_silent_frames: int | None = None,
                       sampling: SamplingConfig | None = None) -> ChunkStream:
        """Turn-based, streamed: the user speaks while the agent listens, then the agent replies
        for `max_steps` frames (or until `stop_after_silent_frames` silent frames in a row).
        `sampling` replaces the reference temperatures and top-k (then `greedy` is not read)."""
        user_pcm = prepare_user_audio(audio, sample_rate)
        _check_steps(max_steps, stop_after_silent_frames)
        conversation = self.conversation(voice_wav or voice, system_prompt, seed, greedy, sampling)
        return ChunkStream(self._turn(conversation, user_pcm, max_steps, stop_after_silent_frames))

    def _turn(self, conversation: Conversation, user_pcm: np.ndarray, max_steps: int,
              stop_after_silent_frames: int | None) -> Iterator[AudioChunk]:
        for frame in _frames_of(user_pcm, self.frame_samples):
            conversation.step(frame, agent_listens=True, decode=False)
        silent_mic = np.zeros(self.frame_samples, dtype=np.float32)
        silent_run = 0
        for index in range(max_steps):
            result = conversation.step(silent_mic)
            yield _chunk(result, index)
            silent_run = silent_run + 1 if _rms(result.pcm) < SILENT_FRAME_RMS else 0
            if stop_after_silent_frames and silent_run >= stop_after_silent_frames:
                return

    def respond(self, audio: Any, **kwargs: Any) -> Response:
        """Turn-based: the whole reply at once (the chunks of `respond_stream`, joined)."""
        chunks = list(self.respond_stream(audio, **kwargs))
        return _response(chunks)

    def respond_duplex(self, audio: Any, *, sample_rate: int = SAMPLE_RATE, voice: str = DEFAULT_VOICE,
                       voice_wav: str | None = None, system_prompt: str = DEFAULT_PROMPT, seed: int | None = None,
                       greedy: bool = False, on_chunk: Callable[[AudioChunk], None] | None = None) -> Response:
        """Full duplex over a recording, as the reference offline script: one agent frame per
        input frame, the reply as long as the input. `on_chunk` sees each frame as it is made."""
        user_pcm = prepare_user_audio(audio, sample_rate)
        conversation = self.conversation(voice_wav or voice, system_prompt, seed, greedy)
        chunks = []
        for index, frame in enumerate(_frames_of(user_pcm, self.frame_samples)):
            chunks.append(_chunk(conversation.step(frame), index))
            if on_chunk is not None:
                on_chunk(chunks[-1])
        response = _response(chunks)
        response.audio = response.audio[: user_pcm.shape[-1]]
        return response

    async def respond_realtime(self, mic_frames: AsyncIterator[np.ndarray], *, sample_rate: int = SAMPLE_RATE,
                               voice: str = DEFAULT_VOICE, voice_wav: str | None = None,
                               system_prompt: str = DEFAULT_PROMPT, seed: int | None = None,
                               greedy: bool = False, sampling: SamplingConfig | None = None) -> AsyncIterator[AudioChunk]:
        """Full duplex in lock-step: microphone blocks of any size in, one 1920-sample agent
        frame out per 1920 samples in. Stops when the input ends or the consumer stops.
        `sampling` replaces the reference temperatures and top-k (then `greedy` is not read).
        With `enable_batching`, the conversation runs as one row of the shared batch."""
        sampling = sampling or SamplingConfig(greedy=greedy)
        if self._batcher is not None:
            async for chunk in self._batched_realtime(mic_frames, sample_rate, voice_wav or voice, system_prompt, seed, sampling):
                yield chunk
            return
        conversation = await asyncio.to_thread(self.conversation, voice_wav or voice, system_prompt, seed, sampling=sampling)
        index = 0
        async for frame in model_rate_frames(mic_frames, sample_rate, self.frame_samples):
            yield _chunk(await asyncio.to_thread(conversation.step, frame), index)
            index += 1

    async def _batched_realtime(self, mic_frames: AsyncIterator[np.ndarray], sample_rate: int, voice: str,
                                system_prompt: str, seed: int | None, sampling: SamplingConfig) -> AsyncIterator[AudioChunk]:
        persona = await asyncio.to_thread(self.persona, voice, system_prompt)
        frames = self._batcher.conversation(mic_frames, persona, sampling, sample_rate, seed)
        async with contextlib.aclosing(frames):
            index = 0
            async for out in frames:
                yield AudioChunk(pcm=out.pcm, text=monologue_piece(self.tokenizer, out.text_token), frame_index=index, elapsed_ms=out.elapsed_ms,
                                 text_token=out.text_token, agent_codes=out.agent_codes)
                index += 1

    def respond_diagnostic(self, audio: Any, *, sample_rate: int = SAMPLE_RATE, voice: str = DEFAULT_VOICE,
                           voice_wav: str | None = None, system_prompt: str = DEFAULT_PROMPT, max_steps: int = 75,
                           seed: int | None = None, greedy: bool = False) -> tuple[np.ndarray, DiagnosticInfo]:
        """`respond` with per-frame statistics of every temporal layer's output, text and audio
        entropies, NaN/Inf detection, and the time spent in each phase."""
        user_pcm = prepare_user_audio(audio, sample_rate)
        _check_steps(max_steps, None)
        recorder = DiagnosticRecorder(self.lm)
        started = time.perf_counter()
        conversation = self.conversation(voice_wav or voice, system_prompt, seed, greedy)
        recorder.add_phase("persona", time.perf_counter() - started)
        chunks = []
        with recorder.attached(conversation.generator):
            for frame in _frames_of(user_pcm, self.frame_samples):
                recorder.add_frame(conversation.step(frame, agent_listens=True, decode=False, on_output=recorder.on_output), "listen")
            silent_mic = np.zeros(self.frame_samples, dtype=np.float32)
            for index in range(max_steps):
                result = conversation.step(silent_mic, on_output=recorder.on_output)
                recorder.add_frame(result, "reply")
                chunks.append(_chunk(result, index))
        audio_out = np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, np.float32)
        return audio_out, recorder.finish()


def _check_steps(max_steps: int, stop_after: int | None) -> None:
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise PersonaPlexError(f"max_steps must be a positive integer, got {max_steps!r}")
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise PersonaPlexError(f"stop_after_silent_frames must be a positive integer or None, got {stop_after!r}")


def _frames_of(pcm: np.ndarray, frame_samples: int) -> Iterator[np.ndarray]:
    """Whole frames of `pcm`, the last one zero-padded."""
    frames = -(-pcm.shape[-1] // frame_samples)
    padded = np.zeros(frames * frame_samples, dtype=np.float32)
    padded[: pcm.shape[-1]] = pcm
    return iter(padded.reshape(frames, frame_samples))


def _rms(pcm: np.ndarray | None) -> float:
    return float(np.sqrt(np.mean(np.square(pcm)))) if pcm is not None and pcm.size else 0.0


def _chunk(result: FrameResult, index: int) -> AudioChunk:
    if result.pcm is None:  # only the first frames of a bare (persona-less) generator lack audio
        raise RuntimeError(f"frame {index} produced no agent audio")
    return AudioChunk(pcm=result.pcm, text=result.text, frame_index=index, elapsed_ms=sum(result.timings_ms.values()),
                  text_token=result.text_token, agent_codes=result.agent_codes)


def _response(chunks: list[AudioChunk]) -> Response:
    audio = np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, dtype=np.float32)
    frames = [FrameOutput(c.frame_index, c.text, c.text_token, c.agent_codes) for c in chunks]
    text_tokens = [c.text_token for c in chunks]
    return Response(audio=audio, text_tokens=text_tokens, text="".join(c.text for c in chunks).strip(), frames=frames)
