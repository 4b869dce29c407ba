"""The library: load PersonaPlex once, then talk to it with four calls.

    engine = PersonaPlex.from_pretrained()              # or a local folder
    reply = engine.respond(user_pcm, sample_rate=16000)  # turn-based
    for chunk in engine.respond_stream(user_pcm): ...    # the same, chunk by chunk
    async for chunk in engine.respond_realtime(mic): ... # full duplex, lock-step
    audio, info = engine.respond_diagnostic(user_pcm)    # with hidden-state statistics
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .audio.io import SAMPLE_RATE, model_rate_frames, normalize_loudness, prepare_user_audio, read_voice_wav
from .errors import PersonaPlexError, UnknownVoiceError
from .hub import LM_FILENAME, MIMI_FILENAME, MLX_MIMI_FILENAME, find_voices_dir, is_mlx_folder, resolve_model_folder
from .model.config import ModelConfig
from .model.layers import READABLE_KERNELS
from .model.lm import LMModel
from .model.lm_checkpoint import load_lm
from .model.mimi import Mimi, load_mimi
from .model.formats import KV_CACHE_FORMATS, WEIGHT_FORMATS
from .runtime.diagnostics import DiagnosticInfo, DiagnosticRecorder
from .runtime.frames import AudioChunk, chunk_of
from .runtime.generation import FrameGenerator
from .runtime.persona import PersonaSnapshot, build_script, prefill_batched
from .runtime.prompts import DEFAULT_PROMPT, check_system_prompt, wrap_system_prompt
from .runtime.runner import FrameRunner
from .runtime.sampling import SamplingConfig
from .runtime.scheduler import FrameScheduler, RowHandle
from .runtime.validation import check_max_steps
from .runtime.voices import DEFAULT_VOICE, VoicePrompt, is_wav_voice, load_voice
from .text.tokenizer import TEXT_TOKENIZER_FILENAME, TextTokenizer

KV_CACHE_DTYPES = dict(zip(KV_CACHE_FORMATS, (None, torch.float8_e4m3fn)))  # None: the activation dtype
SILENT_FRAME_RMS = 1e-3  # -60 dBFS: quieter agent frames count as silence for early stopping


@dataclass
class LoadProgress:
    stage: str  # "download" | "load" | "warmup" | "ready"
    fraction: float | None
    message: str
    elapsed_s: float


@dataclass
class Response:
    audio: np.ndarray  # float32, 24 kHz
    text_tokens: list[int]
    text: str
    frames: list[AudioChunk] = field(default_factory=list)


class ChunkStream:
    """Chunks of a reply as they are made: iterate it, or `async for` over it (waiting for
    each frame happens in a worker thread so the event loop never blocks)."""

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
    """A loaded model (LM + Mimi + tokenizer + voices) serving any number of conversations.

    Every call runs its conversation as a row of one batched frame (`FrameScheduler` over a
    `FrameRunner`: CUDA graphs on a GPU, the readable eager frame elsewhere). `max_sessions`
    is how many conversations run at once; more wait for a free row.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, lm: LMModel, mimi: Mimi, tokenizer: TextTokenizer, voices_dir: Path | None,
                 weights: str = "bf16", *, max_sessions: int = 1, kv_cache: str = "bf16",
                 use_graphs: bool | None = None, compile_frame: bool | None = None, persona_cache_size: int = 8):
        _check_engine_options(max_sessions, kv_cache)
        self.lm, self.mimi, self.tokenizer = lm, mimi, tokenizer
        self.voices_dir = voices_dir
        self.weights = weights
        self.max_sessions = max_sessions
        self.kv_cache = kv_cache
        self.use_graphs = use_graphs
        self.compile_frame = compile_frame
        self.device = lm.text_linear.weight.device
        self.compute_lock = threading.Lock()
        self._personas: OrderedDict[tuple, PersonaSnapshot] = OrderedDict()
        self._persona_cache_size = persona_cache_size
        self._scheduler: FrameScheduler | None = None
        self._scheduler_lock = threading.Lock()

    @property
    def frame_samples(self) -> int:
        return self.mimi.config.frame_samples

    @property
    def scheduler(self) -> FrameScheduler:
        """The frame every conversation runs in, made on first use (its KV cache holds
        `max_sessions` conversations)."""
        with self._scheduler_lock:
            if self._scheduler is None:
                runner = FrameRunner(self.lm, self.mimi, self.max_sessions, kv_dtype=KV_CACHE_DTYPES[self.kv_cache],
                                     use_graphs=self.use_graphs, compile_frame=self.compile_frame)
                self._scheduler = FrameScheduler(runner, self.tokenizer, self.compute_lock)
            return self._scheduler

    def frame_stats(self) -> dict[str, float | int]:
        """How the shared frame is doing (see `FrameScheduler.stats`), and the device memory
        peak on a GPU; empty before the first conversation."""
        if self._scheduler is None:
            return {}
        stats = self._scheduler.stats()
        if self.device.type == "cuda":
            stats["gpu_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2)
        return stats

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        weights: str = "bf16",
        progress: Callable[[LoadProgress], None] | None = None,
        *,
        max_sessions: int = 1,
        kv_cache: str = "bf16",
        use_graphs: bool | None = None,
        compile_frame: bool | None = None,
    ) -> "PersonaPlex":
        """Load from a local folder or a Hugging Face repo id (default `nvidia/personaplex-7b-v1`).

        `device` defaults to CUDA when available; `dtype` to bf16 on CUDA and float32 on CPU.
        `weights` picks the LM's linear-layer format (bf16 as stored, fp8, int4, int8);
        `max_sessions` how many conversations run at once, `kv_cache` their cache format
        (bf16, or fp8 for half the memory); `use_graphs` defaults to True on CUDA, and so does
        `compile_frame` (torch.compile of the frame before its graph is captured: a minute or
        two at the first frame, which PyTorch caches on disk; False skips it for a slower frame).
        """
        if weights not in WEIGHT_FORMATS:
            raise PersonaPlexError(f"unknown weights format {weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
        _check_engine_options(max_sessions, kv_cache)  # before minutes of loading, not after
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
        engine = cls(lm, mimi, tokenizer, find_voices_dir(folder), weights=weights, max_sessions=max_sessions,
                     kv_cache=kv_cache, use_graphs=use_graphs, compile_frame=compile_frame)
        report("warmup", 0.0, "warming up (one frame, then the default persona)")
        engine.warmup()
        report("ready", 1.0, f"ready on {device} in {time.perf_counter() - started:.1f} s")
        return engine

    def warmup(self) -> None:
        """Run one frame with every row free (on a GPU this compiles the kernels and captures
        the frame's graph), then prefill the default persona when it fits this model, so the
        first conversation starts fast. Needs no persona: any valid model warms up."""
        scheduler = self.scheduler
        with self.compute_lock:
            runner = scheduler.runner
            runner.run(torch.zeros(runner.batch_size, self.frame_samples, device=self.device),
                       torch.zeros(runner.batch_size, dtype=torch.bool, device=self.device))
            for row in range(runner.batch_size):
                runner.leave(row)
        if self.voices_dir is None:
            return
        try:
            self.persona()
        except PersonaPlexError:  # e.g. a short-context model: only calls that ask for it fail
            pass

    # ------------------------------------------------------------------ personas

    def persona(self, voice: str = DEFAULT_VOICE, system_prompt: str = DEFAULT_PROMPT) -> PersonaSnapshot:
        """The prefilled state for (voice, prompt), computed once and cached."""
        check_system_prompt(system_prompt, name="system_prompt")  # type, Unicode, length: first
        if not isinstance(voice, (str, Path)):
            raise UnknownVoiceError(f"voice must be a preset name or a file path, got {type(voice).__name__}")
        # A WAV voice is keyed by its modification time too, so an edited file is prefilled anew.
        wav_version = Path(voice).stat().st_mtime_ns if is_wav_voice(voice) and Path(voice).is_file() else None
        key = (str(voice), wav_version, system_prompt)
        with self.compute_lock:
            if key in self._personas:
                self._personas.move_to_end(key)
                return self._personas[key]
        # Checking that the prompt fits the context and tokenizing it need no model: outside the lock.
        check_system_prompt(system_prompt, self.tokenizer, self.lm.config.context)
        prompt_tokens = self.tokenizer.encode(wrap_system_prompt(system_prompt)) if system_prompt.strip() else []
        preset = None if is_wav_voice(voice) else self._preset(voice)
        with self.compute_lock, torch.no_grad():
            if preset is None:
                script = build_script(self.lm, prompt_tokens, voice_codes=self._encode_voice_wav(Path(voice)))
            else:
                script = build_script(self.lm, prompt_tokens, voice=preset)
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
        pcm = normalize_loudness(read_voice_wav(path), SAMPLE_RATE)
        state = self.mimi.init_stream(1)
        codes = [self.mimi.encode_step(torch.from_numpy(frame).to(self.device).view(1, 1, -1), state)[0, :, 0]
                 for frame in _frames_of(pcm, self.frame_samples)]
        return torch.stack(codes, dim=1)

    # ------------------------------------------------------------------ rows

    def _open_row(self, voice: str, system_prompt: str, seed: int | None, sampling: SamplingConfig,
                  deliver: Callable, paced: bool) -> RowHandle:
        persona = self.persona(voice, system_prompt)
        return self.scheduler.open(persona, sampling, _check_seed(seed), deliver, paced=paced)

    def _offline(self, frames: list[tuple[np.ndarray, bool]], voice: str, system_prompt: str, seed: int | None,
                 sampling: SamplingConfig) -> Iterator[AudioChunk]:
        """A recording's frames (pcm, agent listens) through a row; yields one chunk per frame.
        Closing the iterator frees the row."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        row = self._open_row(voice, system_prompt, seed, sampling, outputs.put, paced=False)
        try:
            for pcm, listens in frames:
                row.push(pcm, listens)
            row.end_input()
            while (item := outputs.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            row.close()

    # ------------------------------------------------------------------ the four calls

    def respond_stream(self, audio: Any, *, sample_rate: int = SAMPLE_RATE, voice: str = DEFAULT_VOICE,
                       voice_wav: str | None = None, system_prompt: str = DEFAULT_PROMPT, max_steps: int = 75,
                       seed: int | None = None, greedy: bool = False,
                       stop_after_silent_frames: int | None = None,
                       sampling: SamplingConfig | None = None,
                       on_listen: Callable[[], None] | None = None) -> ChunkStream:
        """Turn-based, streamed: the user speaks while the agent listens (held at silence),
        then the agent replies for `max_steps` frames (or until `stop_after_silent_frames`
        silent frames in a row), hearing silence. `sampling` replaces the reference temperatures and top-k
        (`greedy` still takes the argmax everywhere). `on_listen` is called after each 80 ms frame
        of the user's audio is heard (for progress)."""
        user_pcm = prepare_user_audio(audio, sample_rate)
        _check_steps(max_steps, stop_after_silent_frames)
        silent_mic = np.zeros(self.frame_samples, dtype=np.float32)
        frames = [(pcm, True) for pcm in _frames_of(user_pcm, self.frame_samples)]
        frames += [(silent_mic, False)] * max_steps
        chunks = self._offline(frames, voice_wav or voice, system_prompt, seed, _sampling(sampling, greedy))
        return ChunkStream(_reply(chunks, listening_frames=len(frames) - max_steps,
                                  stop_after_silent_frames=stop_after_silent_frames, on_listen=on_listen))

    def respond(self, audio: Any, **kwargs: Any) -> Response:
        """Turn-based: the whole reply at once (the chunks of `respond_stream`, joined)."""
        chunks = list(self.respond_stream(audio, **kwargs))
        return _response(chunks)

    def respond_duplex(self, audio: Any, *, sample_rate: int = SAMPLE_RATE, voice: str = DEFAULT_VOICE,
                       voice_wav: str | None = None, system_prompt: str = DEFAULT_PROMPT, seed: int | None = None,
                       greedy: bool = False, on_chunk: Callable[[AudioChunk], None] | None = None,
                       sampling: SamplingConfig | None = None) -> Response:
        """Full duplex over a recording, as the reference offline script: one agent frame per
        input frame, the reply as long as the input. `on_chunk` sees each frame as it is made."""
        user_pcm = prepare_user_audio(audio, sample_rate)
        frames = [(pcm, False) for pcm in _frames_of(user_pcm, self.frame_samples)]
        chunks = []
        for chunk in self._offline(frames, voice_wav or voice, system_prompt, seed, _sampling(sampling, greedy)):
            chunks.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
        response = _response(chunks)
        response.audio = response.audio[: user_pcm.shape[-1]]
        return response

    async def respond_realtime(self, mic_frames: AsyncIterator[np.ndarray], *, sample_rate: int = SAMPLE_RATE,
                               voice: str = DEFAULT_VOICE, voice_wav: str | None = None,
                               system_prompt: str = DEFAULT_PROMPT, seed: int | None = None,
                               greedy: bool = False, sampling: SamplingConfig | None = None) -> AsyncIterator[AudioChunk]:
        """Full duplex in lock-step: microphone blocks of any size in, one 1920-sample agent
        frame out per 1920 samples in. Stops when the input ends or the consumer stops.
        `sampling` replaces the reference temperatures and top-k
        (`greedy` still takes the argmax everywhere)."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def deliver(item: object) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        row = await asyncio.to_thread(self._open_row, voice_wav or voice, system_prompt, seed,
                                      _sampling(sampling, greedy), deliver, True)
        feeder = asyncio.create_task(_feed(row, mic_frames, sample_rate, self.frame_samples, deliver))
        try:
            while (item := await outputs.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            feeder.cancel()
            row.close()

    def respond_diagnostic(self, audio: Any, *, sample_rate: int = SAMPLE_RATE, voice: str = DEFAULT_VOICE,
                           voice_wav: str | None = None, system_prompt: str = DEFAULT_PROMPT, max_steps: int = 75,
                           seed: int | None = None, greedy: bool = False,
                           sampling: SamplingConfig | None = None) -> tuple[np.ndarray, DiagnosticInfo]:
        """`respond` with per-frame statistics of every temporal layer's output, text and audio
        entropies, NaN/Inf detection, and the time spent in each part of the frame.

        Runs the same frame as every other call, in a runner of its own without a graph and
        with the readable kernels, since layer hooks and per-part timings need eager work."""
        user_pcm = prepare_user_audio(audio, sample_rate)
        _check_steps(max_steps, None)
        started = time.perf_counter()
        persona = self.persona(voice_wav or voice, system_prompt)
        recorder = DiagnosticRecorder(self.lm)
        recorder.add_phase("persona", time.perf_counter() - started)
        runner = FrameRunner(self.lm, self.mimi, 1, use_graphs=False, kernels=READABLE_KERNELS)
        runner.join(0, persona, _sampling(sampling, greedy), _check_seed(seed))
        silent_mic = np.zeros(self.frame_samples, dtype=np.float32)
        frames = [(pcm, True, "listen") for pcm in _frames_of(user_pcm, self.frame_samples)]
        frames += [(silent_mic, False, "reply")] * max_steps
        reply = []
        with recorder.attached(runner.generator), torch.no_grad():
            for pcm, listens, phase in frames:
                with self.compute_lock:
                    chunk, timings = _timed_frame(runner, self.tokenizer, pcm, listens, len(reply))
                recorder.add_frame(chunk, phase, timings)
                if phase == "reply":
                    reply.append(chunk)
        audio_out = np.concatenate([c.pcm for c in reply]) if reply else np.zeros(0, np.float32)
        return audio_out, recorder.finish()


def _timed_frame(runner: FrameRunner, tokenizer: TextTokenizer, pcm: np.ndarray, listens: bool,
                 index: int) -> tuple[AudioChunk, dict[str, float]]:
    """One eager frame of a one-row runner, each part timed (synchronising after each)."""
    runner.user_pcm.copy_(torch.from_numpy(pcm).view(runner.user_pcm.shape))
    runner.agent_listens.fill_(listens)
    timings = {}
    for name, part in runner.parts().items():
        started = time.perf_counter()
        part()
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        timings[name] = (time.perf_counter() - started) * 1e3
    chunk = chunk_of(tokenizer, runner.agent_pcm[0, 0].cpu().numpy(), runner.tokens[0].tolist(), index,
                     sum(timings.values()))
    return chunk, timings


async def _feed(row: RowHandle, mic_frames: AsyncIterator[np.ndarray], sample_rate: int, frame_samples: int,
                deliver: Callable[[object], None]) -> None:
    """Microphone blocks into the row, re-framed at the model's rate; bad audio ends this
    conversation with the error."""
    try:
        async for frame in model_rate_frames(mic_frames, sample_rate, frame_samples):
            row.push(frame)
        row.end_input()
    except Exception as err:
        deliver(err)


def _reply(chunks: Iterator[AudioChunk], listening_frames: int, stop_after_silent_frames: int | None,
           on_listen: Callable[[], None] | None = None) -> Iterator[AudioChunk]:
    """The reply frames of a turn (the frames while the user spoke are dropped), numbered from
    0, stopping after `stop_after_silent_frames` silent frames in a row."""
    silent_run = 0
    try:
        for chunk in chunks:
            if chunk.frame_index < listening_frames:
                if on_listen is not None:
                    on_listen()
                continue
            chunk = replace(chunk, frame_index=chunk.frame_index - listening_frames)
            yield chunk
            silent_run = silent_run + 1 if _rms(chunk.pcm) < SILENT_FRAME_RMS else 0
            if stop_after_silent_frames and silent_run >= stop_after_silent_frames:
                return
    finally:
        chunks.close()


def _sampling(sampling: SamplingConfig | None, greedy: bool) -> SamplingConfig:
    if sampling is None:
        return SamplingConfig(greedy=greedy)
    return replace(sampling, greedy=True) if greedy else sampling


def _check_engine_options(max_sessions: Any, kv_cache: Any) -> None:
    _check_positive_int("max_sessions", max_sessions)
    if kv_cache not in KV_CACHE_FORMATS:
        raise PersonaPlexError(f"unknown KV cache format {kv_cache!r}: choose one of {', '.join(KV_CACHE_FORMATS)}")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PersonaPlexError(f"{name} must be a positive integer, got {value!r}")


def _check_seed(seed: Any) -> int | None:
    """Seeds are what the sampler's 64-bit counters hold: an int in [0, 2**63)."""
    if seed is None:
        return None
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise PersonaPlexError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    return seed


def _check_steps(max_steps: int, stop_after: int | None) -> None:
    check_max_steps(max_steps)
    if stop_after is not None:
        _check_positive_int("stop_after_silent_frames", stop_after)


def _frames_of(pcm: np.ndarray, frame_samples: int) -> list[np.ndarray]:
    """Whole frames of `pcm`, the last one zero-padded."""
    frames = -(-pcm.shape[-1] // frame_samples)
    padded = np.zeros(frames * frame_samples, dtype=np.float32)
    padded[: pcm.shape[-1]] = pcm
    return list(padded.reshape(frames, frame_samples))


def _rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(pcm)))) if pcm.size else 0.0


def _response(chunks: list[AudioChunk]) -> Response:
    audio = np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, dtype=np.float32)
    text_tokens = [c.text_token for c in chunks]
    return Response(audio=audio, text_tokens=text_tokens, text="".join(c.text for c in chunks).strip(), frames=chunks)
