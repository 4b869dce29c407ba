"""`personaplex bench`: frame time of the full 7B shapes on this GPU, ours and upstream's.

Weights are random (their values do not change the speed): the LM is built in bf16 straight
on the device by `personaplex.model.random_init` (scaled like a trained model, so that it
does not amplify rounding and the quality notes mean something), Mimi and upstream's LM
filled with small normal values. Measured:
build time, time to first frame, ms per frame split into Mimi encode / LM step / Mimi
decode (median and p99 over >= 100 frames after warm-up, CUDA events), at B sessions in
lockstep and two context fills (early: a short persona; full: every one of the 3000 KV slots
visible), eager vs one-CUDA-graph frames, bf16 / fp8 / int4 weights, peak GPU memory, the
time from "new conversation with a cached persona" to its first agent frame, greedy
agreement of eager vs graph, teacher-forced logit error of each format vs bf16, and
upstream moshi 0.2.13 when it imports (`scripts/setup.sh --test` puts it in .oracle/, outside
.venv: add PYTHONPATH=.oracle). Rows go to DIR/<card>.json (+ a PNG) and a table on stdout.

    python -m personaplex.bench --out DIR [--sessions 1,8,32,64] [--frames 100]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .api import KV_CACHE_DTYPES
from .model.config import LMConfig, MimiConfig
from .model.formats import KV_CACHE_FORMATS, WEIGHT_FORMATS
from .model.layers import READABLE_KERNELS, Kernels
from .model.lm import LMModel
from .model.random_init import build_random_lm, compare_logits, random_codes, teacher_forced_logits
from .model.mimi import Mimi
from .runtime.capacity import free_gpu_bytes, sessions_that_fit
from .runtime.runner import COMPILE_TUNINGS, FrameRunner
from .runtime.generation import FrameGenerator
from .runtime.persona import PersonaSnapshot, build_script, prefill_batched
from .runtime.sampling import SamplingConfig
from .runtime.voices import VoicePrompt

if TYPE_CHECKING:
    from .api import PersonaPlex

INIT_STD = 0.02
PERSONA_VOICE_FRAMES = 10
PERSONA_PROMPT_TOKENS = 20  # with 12 silence frames: a 43-frame persona, an "early" context
QUALITY_FRAMES = 64
# The fast frame with its depformer steps compiled rather than fused (--depformer-ab).
COMPILED_DEPFORMER = "graph-compiled-depformer"


@dataclass
class Timing:
    """Per-frame milliseconds of a timed run."""

    frame: list[float]
    encode: list[float]
    lm: list[float]
    decode: list[float]
    back_to_back: float | None = None  # ms a frame with every frame launched before any is waited for


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def _synced_seconds(start: float) -> float:
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Small normal weights everywhere but the norms (which keep their ones/zeros)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, INIT_STD, generator=generator)
            else:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
        for name, buffer in module.named_buffers():
            if name.endswith("cluster_usage") or name.endswith("_initialized"):
                buffer.fill_(1.0)
            elif name.endswith("embedding_sum"):
                buffer.normal_(0.0, 1.0, generator=generator)


def build_lm(weights: str, device: torch.device) -> tuple[LMModel, float]:
    """The 7B LM with random weights in `weights` format, and the seconds it took."""
    start = time.perf_counter()
    # The agent's 8 depformer steps only, as the engine loads it (`load_lm(depformer_steps=8)`);
    # weights scaled like a trained model's, so the quality notes mean something.
    lm = build_random_lm(LMConfig(dep_q=8), device, torch.bfloat16)
    if weights != "bf16":
        from .model.quantize import quantize_model

        quantize_model(lm, weights)
    return lm, _synced_seconds(start)


def build_mimi(device: torch.device) -> Mimi:
    """Full-size Mimi, float32 as the engine loads it."""
    mimi = Mimi(MimiConfig(), device=device, dtype=torch.float32)
    _randomize_(mimi, torch.Generator(device=device).manual_seed(1))
    return mimi.eval().requires_grad_(False)


def make_persona(lm: LMModel) -> tuple[PersonaSnapshot, float]:
    """A random voice preset + system prompt, prefilled once: (snapshot, prefill seconds)."""
    device = lm.text_linear.weight.device
    c = lm.config
    gen = torch.Generator(device=device).manual_seed(2)
    cache = torch.randint(0, c.card, (1, c.num_codebooks, c.max_delay + 3), generator=gen, device=device)
    voice = VoicePrompt(torch.randn(PERSONA_VOICE_FRAMES, 1, 1, c.dim, generator=gen, device=device).to(torch.bfloat16), cache, "bench")
    prompt = torch.randint(0, c.text_card, (PERSONA_PROMPT_TOKENS,), generator=gen, device=device).tolist()
    start = time.perf_counter()
    generator = FrameGenerator(lm, 1, agent_only=True, seed=0)
    prefill_batched(generator, build_script(lm, prompt, voice=voice))
    snapshot = PersonaSnapshot.capture(generator)
    return snapshot, _synced_seconds(start)


def random_engine(device: torch.device, weights: str = "bf16", *, max_sessions: int = 1, kv_cache: str = "bf16",
                  use_graphs: bool | None = None) -> "PersonaPlex":
    """A whole engine at the full 7B shape with random weights, for measuring what users run
    (the public calls, `personaplex serve --random-weights`) without the 16.7 GB download:
    the stand-in tokenizer and 18 random voice presets live in a temporary folder."""
    import tempfile

    from .api import PersonaPlex
    from .runtime.voices import VOICE_NAMES, write_voice_pt
    from .text.stand_in import write_tiny_tokenizer
    from .text.tokenizer import TEXT_TOKENIZER_FILENAME, TextTokenizer

    lm, _ = build_lm(weights, device)
    folder = Path(tempfile.mkdtemp(prefix="personaplex-random-"))
    write_tiny_tokenizer(folder / TEXT_TOKENIZER_FILENAME)
    gen = torch.Generator().manual_seed(2)
    c = lm.config
    for name in VOICE_NAMES:
        embeddings = torch.randn(PERSONA_VOICE_FRAMES, 1, 1, c.dim, generator=gen).to(torch.bfloat16)
        cache = torch.randint(0, c.card, (1, c.num_codebooks, c.max_delay + 3), generator=gen)
        write_voice_pt(folder / "voices" / f"{name}.pt", embeddings, cache)
    engine = PersonaPlex(lm, build_mimi(device), TextTokenizer(folder / TEXT_TOKENIZER_FILENAME), folder / "voices",
                         weights=weights, max_sessions=max_sessions, kv_cache=kv_cache, use_graphs=use_graphs)
    engine.warmup()
    return engine


def user_audio(frames: int, batch: int, device: torch.device) -> torch.Tensor:
    """Random (not zero) user PCM [frames, B, 1920]."""
    gen = torch.Generator(device=device).manual_seed(3)
    return 0.1 * torch.randn(frames, batch, 1920, generator=gen, device=device)


def fill_context(runner: FrameRunner) -> int:
    """Make every KV slot of every row visible (a conversation 3000 frames in), with random
    keys/values, without running 3000 frames. Returns the context length."""
    temporal = runner.generator.temporal
    capacity = temporal.capacity
    for cache in (temporal.keys, temporal.values):
        for layer in cache:  # one layer at a time: fp8 caches need a bf16 staging tensor
            layer.copy_(torch.randn(layer.shape, device=layer.device, dtype=torch.bfloat16))
    temporal.slot_positions.copy_(torch.arange(capacity, device=temporal.slot_positions.device).expand_as(temporal.slot_positions))
    temporal.next_position.fill_(capacity)
    return capacity


def time_frames(parts: list[Callable[[], None]], audio: torch.Tensor, load: Callable[[torch.Tensor], None],
                warmup: int) -> Timing:
    """Run `load(audio[i])` then the parts in order for every frame; CUDA events between parts.
    A single part is a whole frame (its split is unknown)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(len(parts) + 1)]
    per_frame: list[list[float]] = []
    for index in range(audio.shape[0]):
        load(audio[index])
        events[0].record()
        for part, event in zip(parts, events[1:]):
            part()
            event.record()
        events[-1].synchronize()
        if index >= warmup:
            per_frame.append([events[i].elapsed_time(events[i + 1]) for i in range(len(parts))])
    frame = [sum(row) for row in per_frame]
    if len(parts) == 3:
        return Timing(frame, *([row[i] for row in per_frame] for i in range(3)))
    return Timing(frame, [], [], [])


def back_to_back_ms(runner: FrameRunner, audio: torch.Tensor, speaking: torch.Tensor, warmup: int) -> float:
    """Milliseconds a frame when every frame is launched before any is waited for (a recording,
    a backlog of live audio): the graphed parts of neighbouring frames overlap on the device.
    `frame_ms_median` is a frame alone, launched and waited for (a live reply's compute)."""
    for index in range(warmup):
        runner.launch(audio[index], speaking)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for index in range(warmup, audio.shape[0]):
        runner.launch(audio[index], speaking)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / (audio.shape[0] - warmup)


def capture(fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device("cuda")
        self.card = torch.cuda.get_device_name()
        self.date = datetime.date.today().isoformat()
        self.rows: list[dict] = []
        self.api_rows: list[dict] = []
        self.notes: dict[str, object] = {"card": self.card, "torch": torch.__version__}
        self.reference_logits: torch.Tensor | None = None  # the bf16 LM's, for the quality notes
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    # ---- output

    def add_row(self, impl: str, weights: str, sessions: int, context: int, timing: Timing) -> None:
        def median_or_none(values: list[float]) -> float | None:  # a whole-frame graph has no split
            return round(_median(values), 3) if values else None

        row = dict(
            impl=impl, weights=weights, kv=self.args.kv, sessions=sessions, context_frames=context,
            frame_ms_median=round(_median(timing.frame), 3), frame_ms_p99=round(_p99(timing.frame), 3),
            frame_ms_back_to_back=None if timing.back_to_back is None else round(timing.back_to_back, 3),
            encode_ms=median_or_none(timing.encode), lm_ms=median_or_none(timing.lm), decode_ms=median_or_none(timing.decode),
            gpu_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2), timed_frames=len(timing.frame),
            card=self.card, date=self.date,
        )
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def note(self, key: str, value: object) -> None:
        self.notes[key] = value
        print(f"note {key}: {value}", flush=True)
        self.save()

    def save(self) -> None:
        name = self.card.replace(" ", "_")
        (self.out / f"{name}.json").write_text(json.dumps({"rows": self.rows, "notes": self.notes}, indent=1))

    def guarded(self, label: str, work: Callable[[], None]) -> None:
        """One section; a failure (out of memory, a missing package) is noted, not fatal."""
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - the benchmark reports what failed and goes on
            self.note(f"failed: {label}", f"{type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
        gc.collect()
        torch.cuda.empty_cache()

    # ---- ours

    def ours(self, weights: str) -> None:
        torch.cuda.reset_peak_memory_stats()
        lm, build_s = build_lm(weights, self.device)
        mimi = build_mimi(self.device)
        self.note(f"{weights}: build_s", round(build_s, 2))
        self.note(f"{weights}: weights_gb", round(torch.cuda.memory_allocated() / 1e9, 2))
        for kv, kv_dtype in KV_CACHE_DTYPES.items():
            fit = sessions_that_fit(lm.config, free_gpu_bytes(self.device), kv_dtype or lm.activation_dtype)
            self.note(f"{weights}: sessions that fit at 3000 frames, {kv} KV (computed)", fit)
        persona, prefill_s = make_persona(lm)
        self.note(f"{weights}: persona_prefill_ms (uncached, {persona.frames} frames)", round(1e3 * prefill_s, 1))
        if weights == "bf16":
            self.guarded("graph vs eager", lambda: self.graph_matches_eager(lm, mimi, persona))
        self.guarded(f"{weights} quality", lambda: self.quality(weights, lm))
        for sessions in self.args.sessions:
            self.guarded(f"{weights} B={sessions}", lambda: self.ours_rows(weights, lm, mimi, persona, sessions))

    def ours_rows(self, weights: str, lm: LMModel, mimi: Mimi, persona: PersonaSnapshot, sessions: int) -> None:
        frames, warmup = self.args.frames, self.args.warmup
        torch.cuda.reset_peak_memory_stats()
        audio = user_audio(frames + warmup, sessions, self.device)
        speaking = torch.zeros(sessions, dtype=torch.bool, device=self.device)
        current: dict[str, torch.Tensor] = {}

        def load(pcm: torch.Tensor) -> None:
            current["pcm"] = pcm

        impls = ["graph"]
        if self.args.uncompiled and sessions == 1:
            impls.append("graph-uncompiled")
        if self.args.depformer_ab and sessions <= Kernels.fast().fused_depformer_max_rows:
            impls.append(COMPILED_DEPFORMER)
        if weights == "bf16" and not self.args.no_eager:
            impls.insert(0, "eager")
        for impl in impls:
            # The readable frame (what devices without graphs run), the fast one (the frame
            # compiled, then graphed), the fast one uncompiled, or compiled with the depformer's
            # steps compiled instead of fused: one runner class, options per runner.
            graphed = impl != "eager"
            kernels = Kernels.fast() if graphed else READABLE_KERNELS
            if impl == COMPILED_DEPFORMER:
                kernels = replace(kernels, fused_depformer_max_rows=0)
            runner = FrameRunner(lm, mimi, sessions, kv_dtype=KV_CACHE_DTYPES[self.args.kv], use_graphs=graphed,
                                 compile_frame=impl in ("graph", COMPILED_DEPFORMER), kernels=kernels,
                                 compile_tuning=self.args.compile_tuning)

            def load_eager(pcm: torch.Tensor, runner: FrameRunner = runner) -> None:
                runner.user_pcm.copy_(pcm.view_as(runner.user_pcm))

            for fill in ("early", "full"):
                for row in range(sessions):
                    runner.join(row, persona)
                context = fill_context(runner) if fill == "full" else persona.frames
                with torch.no_grad():
                    if impl == "eager":
                        timing = time_frames(list(runner.parts().values()), audio, load_eager, warmup)
                    else:
                        if fill == "early":
                            self.first_frame(runner, persona, audio[0], weights, sessions)
                        timing = time_frames([lambda runner=runner: runner.run(current["pcm"], speaking)], audio, load, warmup)
                        timing.back_to_back = back_to_back_ms(runner, audio, speaking, warmup)
                        if not runner.compile_frame:  # the compiled parts' graphs are not timed apart
                            split = [capture(part) for part in runner.parts().values()]
                            parts = time_frames([graph.replay for graph in split], audio, load_eager, warmup)
                            timing.encode, timing.lm, timing.decode = parts.encode, parts.lm, parts.decode
                            del split
                tuning = self.args.compile_tuning
                self.add_row(f"personaplex-{impl}" + (f" ({tuning})" if impl == "graph" and tuning != "default" else ""),
                             weights, sessions, context, timing)
            del runner

    def first_frame(self, runner: FrameRunner, persona: PersonaSnapshot, pcm: torch.Tensor, weights: str,
                    sessions: int) -> None:
        """Connect -> first agent frame with a cached persona: join row 0, run one frame. The
        first time also captures the graph (the warm-up); the second is what a new caller sees."""
        for label in ("first_frame_ms (join + frame + graph capture)", "connect_to_first_frame_ms (cached persona, graph ready)"):
            start = time.perf_counter()
            runner.join(0, persona)
            runner.run(pcm, torch.zeros(runner.batch_size, dtype=torch.bool, device=self.device))
            self.note(f"{weights} B={sessions}: {label}", round(1e3 * _synced_seconds(start), 2))

    def graph_matches_eager(self, lm: LMModel, mimi: Mimi, persona: PersonaSnapshot) -> None:
        """Greedy tokens of the graphed frame equal the eager frame's, at full size."""
        audio = user_audio(12, 2, self.device)
        tokens = {}
        speaking = torch.zeros(2, dtype=torch.bool, device=self.device)
        for use_graphs in (False, True):
            runner = FrameRunner(lm, mimi, 2, use_graphs=use_graphs,
                                 kernels=Kernels.fast() if use_graphs else READABLE_KERNELS)
            for row in range(2):
                runner.join(row, persona, SamplingConfig(greedy=True))
            frames = []
            for frame in audio:
                runner.run(frame, speaking)
                frames.append(runner.tokens.clone())
            tokens[use_graphs] = torch.stack(frames)
            del runner
        same = bool(torch.equal(tokens[False], tokens[True]))
        agreement = float((tokens[False] == tokens[True]).float().mean())
        self.note("fast (compiled frame + graph + Triton attention) vs readable eager: greedy tokens equal (B=2, 12 frames)", same)
        self.note("fast vs readable: greedy token agreement", round(agreement, 4))

    # ---- quantization error vs bf16: teacher-forced logits of the streaming path

    def quality(self, weights: str, lm: LMModel) -> None:
        """Text and audio logits of `weights` against the bf16 LM (the same random weights),
        teacher-forced: both see the same random codes for QUALITY_FRAMES frames x 2 rows, fed
        one frame at a time through the streaming path (KV ring, depformer steps), so every
        frame is compared with the same history. The full set (float32 floor, trained-like
        weights, per-layer and kernel errors, bounds) is bench/gpu_quality.py's."""
        codes = random_codes(lm.config, QUALITY_FRAMES, 2, device=self.device)
        logits = teacher_forced_logits(lm, codes, streaming=True)
        if weights == "bf16":
            self.reference_logits = logits
            return
        if self.reference_logits is None:  # bf16 was not among --weights: build it for the comparison
            reference, _ = build_lm("bf16", self.device)
            self.reference_logits = teacher_forced_logits(reference, codes, streaming=True)
            del reference
            torch.cuda.empty_cache()
        stats = compare_logits(logits, self.reference_logits)
        self.note(f"{weights}: logits vs bf16 (teacher-forced streaming, {QUALITY_FRAMES} frames x 2 rows, "
                  "Gaussian random LM of personaplex.model.random_init): relative error, at the worst position, greedy agreement",
                  {key: round(value, 4) for key, value in stats.items()})

    # ---- what a user runs by default: the public calls, one conversation

    def public_api(self, weights: list[str]) -> None:
        """respond_duplex and respond_realtime on a default engine of each weight format (graphs
        on CUDA), and the bf16 one with graphs off (the readable frame: what devices without
        graphs run)."""
        runs = [(fmt, True) for fmt in weights] + ([("bf16", False)] if "bf16" in weights else [])
        for fmt, use_graphs in runs:
            label = "" if use_graphs else " (graphs off)"
            # The engine lives only inside its section, so one is freed before the next is built.
            self.guarded(f"public calls, {fmt}{label}",
                         lambda: self.time_public_calls(random_engine(self.device, fmt, use_graphs=use_graphs), label))

    def time_public_calls(self, engine: "PersonaPlex", label: str) -> None:
        for path in ("respond_duplex", "respond_realtime"):
            self.api_row(engine, path, label)

    def api_row(self, engine: "PersonaPlex", path: str, label: str) -> None:
        import asyncio

        import numpy as np
        import psutil

        frames, warmup = self.args.frames, self.args.warmup
        audio = user_audio(frames + warmup, 1, torch.device("cpu"))[:, 0].numpy().reshape(-1)
        process = psutil.Process()
        process.cpu_percent()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        if path == "respond_duplex":
            chunks = engine.respond_duplex(audio, seed=0).frames
            latencies: list[float] = []
        else:
            chunks, latencies = asyncio.run(_realtime_at_pace(engine, audio.astype(np.float32)))
        duration = time.perf_counter() - started
        frame_ms = [chunk.elapsed_ms for chunk in chunks[warmup:]]
        row = dict(path=path + label, sessions=1, weights=engine.weights, kv=engine.kv_cache,
                   frame_ms_median=round(_median(frame_ms), 3), frame_ms_p99=round(_p99(frame_ms), 3),
                   mic_to_reply_ms_p50=round(_median(latencies[warmup:]), 2) if latencies else None,
                   mic_to_reply_ms_p99=round(_p99(latencies[warmup:]), 2) if latencies else None,
                   dropped_frames=engine.frame_stats()["late_frames"], duration_s=round(duration, 1),
                   cpu_percent=process.cpu_percent(), gpu_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                   card=self.card, date=self.date)
        self.api_rows.append(row)
        print(json.dumps(row), flush=True)
        (self.out / f"{self.card.replace(' ', '_')}-api.json").write_text(json.dumps({"rows": self.api_rows}, indent=1))

    # ---- upstream moshi 0.2.13, as performance.md's peer

    def upstream(self) -> None:
        from moshi.models import LMGen, loaders

        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        lm = loaders.get_moshi_lm(None, lm_kwargs=dict(loaders._lm_kwargs, dep_q=16), device=self.device, dtype=torch.bfloat16)
        _randomize_(lm, torch.Generator(device=self.device).manual_seed(0))
        mimi = loaders.get_mimi(None, device=self.device)
        _randomize_(mimi, torch.Generator(device=self.device).manual_seed(1))
        self.note("moshi: build_s", round(_synced_seconds(start), 2))
        for sessions in self.args.sessions:
            self.guarded(f"moshi B={sessions}", lambda: self.upstream_rows(lm, mimi, sessions, LMGen))

    def upstream_rows(self, lm, mimi, sessions: int, lm_gen_class) -> None:
        frames, warmup = self.args.frames, max(self.args.warmup, 4)
        torch.cuda.reset_peak_memory_stats()
        lm_gen = lm_gen_class(lm, use_sampling=True, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
        audio = user_audio(frames + warmup, sessions, self.device)
        current: dict[str, torch.Tensor] = {}

        def encode() -> None:
            current["codes"] = mimi.encode(current["pcm"])

        def step() -> None:
            current["tokens"] = lm_gen.step(current["codes"])

        def decode() -> None:
            if current["tokens"] is not None:  # None while its delays fill (first frames)
                mimi.decode(current["tokens"][:, 1:9])

        def load(pcm: torch.Tensor) -> None:
            current["pcm"] = pcm.view(sessions, 1, -1)

        with torch.no_grad(), lm_gen.streaming(sessions), mimi.streaming(sessions):
            start = time.perf_counter()
            load(audio[0])
            encode(), step(), decode()
            self.note(f"moshi B={sessions}: first_frame_ms (incl. its graph capture/compile)", round(1e3 * _synced_seconds(start), 1))
            timing = time_frames([encode, step, decode], audio, load, warmup)
        self.add_row("moshi-0.2.13", "bf16", sessions, 0, timing)


async def _realtime_at_pace(engine: "PersonaPlex", audio) -> tuple[list, list[float]]:
    """respond_realtime fed one 80 ms frame every 80 ms, as a microphone does: the chunks, and
    for each the time from its microphone frame being handed over to the reply frame (ms)."""
    import asyncio

    handed: list[float] = []

    async def microphone():
        start = time.perf_counter()
        for index in range(audio.size // 1920):
            await asyncio.sleep(max(0.0, start + 0.08 * index - time.perf_counter()))
            handed.append(time.perf_counter())
            yield audio[index * 1920 : (index + 1) * 1920]

    chunks, latencies = [], []
    async for chunk in engine.respond_realtime(microphone(), seed=0):
        latencies.append((time.perf_counter() - handed[chunk.frame_index]) * 1e3)
        chunks.append(chunk)
    return chunks, latencies


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for axis, full in zip(axes, (False, True)):
        series: dict[str, list[tuple[int, float]]] = {}
        for row in rows:
            if (row["context_frames"] >= 3000) == full:
                series.setdefault(f"{row['impl']} {row['weights']}", []).append((row["sessions"], row["frame_ms_median"]))
        for label, points in sorted(series.items()):
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        axis.axhline(80, color="grey", linestyle="--", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sessions in lockstep (B)")
        axis.set_title("full context (3000 frames)" if full else "early context")
        axis.legend(fontsize=7)
    axes[0].set_ylabel("ms per frame (median)")
    fig.suptitle(f"PersonaPlex 7B frame time, {rows[0]['card']}, {rows[0]['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_table(rows: list[dict]) -> None:
    header = ("impl", "weights", "sessions", "context_frames", "frame_ms_median", "frame_ms_p99", "frame_ms_back_to_back", "encode_ms", "lm_ms", "decode_ms", "gpu_mem_gb")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[key]) for key in header))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for the JSON and PNG ($OUT by default)")
    parser.add_argument("--sessions", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--weights", default="bf16,int4,fp8", help="comma-separated weight formats (bf16 first: the reference)")
    parser.add_argument("--frames", type=int, default=100, help="timed frames per row (>= 100 for the report)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed frames run first, so compiling and graph capture are not timed (5)")
    parser.add_argument("--no-upstream", action="store_true", help="skip upstream moshi")
    parser.add_argument("--kv", choices=KV_CACHE_FORMATS, default="bf16", help="KV cache format")
    parser.add_argument("--no-eager", action="store_true", help="time only the fast (graphed) path")
    parser.add_argument("--uncompiled", action="store_true",
                        help="also time the graphed frame without torch.compile (one conversation)")
    parser.add_argument("--depformer-ab", action="store_true",
                        help="where the fast frame fuses the depformer's steps (one conversation), also time it "
                             "with those steps compiled instead: the whole-frame A/B behind that default")
    parser.add_argument("--compile-tuning", choices=list(COMPILE_TUNINGS), default="default",
                        help="how hard the compiler tunes the fast frame (runtime/runner.py: COMPILE_TUNINGS)")
    parser.add_argument("--api", action="store_true",
                        help="time the public calls instead (respond_duplex, respond_realtime) of each --weights "
                             "format, graphs on, and bf16's with graphs off")
    parser.add_argument("--serve", action="store_true",
                        help="load-test `personaplex serve` with real-time websocket clients instead")
    parser.add_argument("--clients", default="1,8,32,64,128,160", help="with --serve: comma-separated client counts")
    parser.add_argument("--duration", type=float, default=60.0, help="with --serve: seconds of audio per client count")
    parser.add_argument("--url", help="with --serve: a running server (http://HOST:PORT) instead of starting one")
    parser.add_argument("--port", type=int, default=8999, help="with --serve: port of the server it starts")
    parser.add_argument("--serve-weights", default="bf16", help="with --serve: weight format of the server it starts")
    parser.add_argument("--client-processes", type=int, default=6, help="with --serve: processes running the clients")
    parser.add_argument("--server-timeout", type=float, default=600.0, help="with --serve: seconds to wait for the server")


def run(args: argparse.Namespace) -> int:
    if args.serve:
        from .server import loadtest

        return loadtest.run(args)
    try:
        args.sessions = [int(s) for s in str(args.sessions).split(",")]
    except ValueError:
        raise SystemExit(f"personaplex bench: error: --sessions takes whole numbers, comma-separated (e.g. 1,8,32), "
                         f"not {args.sessions!r}") from None
    args.weights = str(args.weights).split(",")
    unknown = [fmt for fmt in args.weights if fmt not in WEIGHT_FORMATS]
    if unknown:
        raise SystemExit(f"personaplex bench: error: unknown weight format {', '.join(unknown)} in --weights: "
                         f"use one or more of {', '.join(WEIGHT_FORMATS)}, comma-separated")
    if not torch.cuda.is_available():
        raise SystemExit("personaplex bench: error: the benchmark needs a CUDA GPU")
    bench = Bench(args)
    if args.api:
        bench.public_api(args.weights)
        return 0
    if not args.no_upstream:
        bench.guarded("moshi", bench.upstream)
    for weights in args.weights:
        bench.guarded(f"ours {weights}", lambda: bench.ours(weights))
    if bench.rows:
        bench.guarded("plot", lambda: plot(bench.rows, bench.out / f"{bench.card.replace(' ', '_')}.png"))
        print_table(bench.rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="personaplex bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
