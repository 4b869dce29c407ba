"""`personaplex bench`: frame time of the full 7B shapes on this GPU, ours and upstream's.

Weights are random (their values do not change the speed): the LM is built in bf16 straight
on the device, then filled with small normal values so nothing overflows. Measured:
build time, time to first frame, ms per frame split into Mimi encode / LM step / Mimi
decode (median and p99 over >= 100 frames after warm-up, CUDA events), at B sessions in
lockstep and two context fills (early: a short persona; full: every one of the 3000 KV slots
visible), eager vs one-CUDA-graph frames, bf16 / fp8 / int4 weights, peak GPU memory, the
time from "new conversation with a cached persona" to its first agent frame, greedy
agreement of eager vs graph, quantization error vs bf16, and upstream moshi 0.2.13 when it
imports. Rows go to DIR/<card>.json (+ a PNG) and a table on stdout.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .model.config import LMConfig, MimiConfig
from .model import lm as lm_module
from .model.layers import compile_elementwise
from .model.lm import LMModel
from .model.mimi import Mimi
from .runtime.capacity import free_gpu_bytes, sessions_that_fit
from .runtime.fast import FastFrameRunner
from .runtime.generation import FrameGenerator, StepInputs
from .runtime.persona import PersonaSnapshot, build_script, prefill_batched
from .runtime.sampling import SamplingConfig
from .runtime.voices import VoicePrompt

INIT_STD = 0.02
PERSONA_VOICE_FRAMES = 10
PERSONA_PROMPT_TOKENS = 20  # with 12 silence frames: a 43-frame persona, an "early" context
QUALITY_FRAMES = 30


@dataclass
class Timing:
    """Per-frame milliseconds of a timed run."""

    frame: list[float]
    encode: list[float]
    lm: list[float]
    decode: list[float]


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
    with torch.device("meta"):
        # The agent's 8 depformer steps only, as the engine loads it (`load_lm(depformer_steps=8)`).
        lm = LMModel(LMConfig(dep_q=8), dtype=torch.bfloat16)
    lm = lm.to_empty(device=device)
    _randomize_(lm, torch.Generator(device=device).manual_seed(0))
    lm.eval().requires_grad_(False)
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


def user_audio(frames: int, batch: int, device: torch.device) -> torch.Tensor:
    """Random (not zero) user PCM [frames, B, 1920]."""
    gen = torch.Generator(device=device).manual_seed(3)
    return 0.1 * torch.randn(frames, batch, 1920, generator=gen, device=device)


def fill_context(runner: FastFrameRunner) -> int:
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
        self.notes: dict[str, object] = {"card": self.card, "torch": torch.__version__}
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)

    # ---- output

    def add_row(self, impl: str, weights: str, sessions: int, context: int, timing: Timing) -> None:
        def median_or_none(values: list[float]) -> float | None:  # a whole-frame graph has no split
            return round(_median(values), 3) if values else None

        row = dict(
            impl=impl, weights=weights, kv=self.args.kv, sessions=sessions, context_frames=context,
            frame_ms_median=round(_median(timing.frame), 3), frame_ms_p99=round(_p99(timing.frame), 3),
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
        for kv in KV_DTYPES:
            fit = sessions_that_fit(lm.config, free_gpu_bytes(self.device), KV_DTYPES[kv])
            self.note(f"{weights}: sessions that fit at 3000 frames, {kv} KV (computed)", fit)
        persona, prefill_s = make_persona(lm)
        self.note(f"{weights}: persona_prefill_ms (uncached, {persona.frames} frames)", round(1e3 * prefill_s, 1))
        if weights == "bf16":
            self.guarded("graph vs eager", lambda: self.graph_matches_eager(lm, mimi, persona))
        self.guarded(f"{weights} quality", lambda: self.quality(weights, lm, mimi, persona))
        for sessions in self.args.sessions:
            self.guarded(f"{weights} B={sessions}", lambda: self.ours_rows(weights, lm, mimi, persona, sessions))

    def ours_rows(self, weights: str, lm: LMModel, mimi: Mimi, persona: PersonaSnapshot, sessions: int) -> None:
        frames, warmup = self.args.frames, self.args.warmup
        torch.cuda.reset_peak_memory_stats()
        runner = FastFrameRunner((lm, mimi), sessions, seed=0, kv_dtype=KV_DTYPES[self.args.kv])
        audio = user_audio(frames + warmup, sessions, self.device)
        current: dict[str, torch.Tensor] = {}

        def load_eager(pcm: torch.Tensor) -> None:
            runner.user_pcm.copy_(pcm.view_as(runner.user_pcm))

        def load(pcm: torch.Tensor) -> None:
            current["pcm"] = pcm

        impls = ("eager", "graph") if weights == "bf16" and not self.args.no_eager else ("graph",)
        for fill in ("early", "full"):
            for impl in impls:
                use_fast_path(impl == "graph")
                for row in range(sessions):
                    runner.join(row, persona)
                context = fill_context(runner) if fill == "full" else persona.frames
                runner.use_graphs = impl == "graph"
                with torch.no_grad():
                    if impl == "eager":
                        timing = time_frames([runner.encode_user, runner.step_model, runner.decode_agent], audio, load_eager, warmup)
                    else:
                        if fill == "early":
                            self.first_frame(runner, persona, audio[0], weights, sessions)
                        timing = time_frames([lambda: runner.run(current["pcm"])], audio, load, warmup)
                        split = [capture(runner.encode_user), capture(runner.step_model), capture(runner.decode_agent)]
                        parts = time_frames([graph.replay for graph in split], audio, load_eager, warmup)
                        timing.encode, timing.lm, timing.decode = parts.encode, parts.lm, parts.decode
                        del split
                self.add_row(f"personaplex-{impl}", weights, sessions, context, timing)

    def first_frame(self, runner: FastFrameRunner, persona: PersonaSnapshot, pcm: torch.Tensor, weights: str,
                    sessions: int) -> None:
        """Connect -> first agent frame with a cached persona: join row 0, run one frame. The
        first time also captures the graph (the warm-up); the second is what a new caller sees."""
        for label in ("first_frame_ms (join + frame + graph capture)", "connect_to_first_frame_ms (cached persona, graph ready)"):
            start = time.perf_counter()
            runner.join(0, persona)
            runner.run(pcm)
            self.note(f"{weights} B={sessions}: {label}", round(1e3 * _synced_seconds(start), 2))

    def graph_matches_eager(self, lm: LMModel, mimi: Mimi, persona: PersonaSnapshot) -> None:
        """Greedy tokens of the graphed frame equal the eager frame's, at full size."""
        audio = user_audio(12, 2, self.device)
        tokens = {}
        for use_graphs in (False, True):
            use_fast_path(use_graphs)
            runner = FastFrameRunner((lm, mimi), 2, sampling=SamplingConfig(greedy=True), use_graphs=use_graphs)
            for row in range(2):
                runner.join(row, persona)
            tokens[use_graphs] = torch.stack([runner.run(frame)[1].clone() for frame in audio])
            del runner
        same = bool(torch.equal(tokens[False], tokens[True]))
        agreement = float((tokens[False] == tokens[True]).float().mean())
        self.note("fast (graph + Triton attention + compiled element-wise) vs readable eager: greedy tokens equal (B=2, 12 frames)", same)
        self.note("fast vs readable: greedy token agreement", round(agreement, 4))

    # ---- quantization error vs bf16, same user codes, greedy

    def quality(self, weights: str, lm: LMModel, mimi: Mimi, persona: PersonaSnapshot) -> None:
        if not hasattr(self, "user_codes"):
            state = mimi.init_stream(1)
            self.user_codes = [mimi.encode_step(frame.view(1, 1, -1), state)[:, :, 0] for frame in user_audio(QUALITY_FRAMES, 1, self.device)]
        generator = FrameGenerator(lm, 1, SamplingConfig(greedy=True), agent_only=True, seed=0)
        persona.restore(generator)
        tokens, logits = [], []
        with torch.no_grad():
            for codes in self.user_codes:
                out = generator.step(StepInputs(user=codes))
                tokens.append(out.tokens[0].cpu())
                logits.append(out.text_logits[0].float().cpu())
        if weights == "bf16":
            self.reference = (tokens, logits)
            return
        ref_tokens, ref_logits = self.reference
        agree = sum(int(torch.equal(a, b)) for a, b in zip(tokens, ref_tokens))
        diverged = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if not torch.equal(a, b)), len(tokens))
        # Logits are comparable only while both histories are the same.
        errors = [float((a - b).norm() / b.norm()) for a, b in zip(logits[: diverged + 1], ref_logits[: diverged + 1])]
        self.note(f"{weights}: greedy frames equal to bf16 ({QUALITY_FRAMES} frames)", agree)
        self.note(f"{weights}: first frame differing from bf16", diverged)
        self.note(f"{weights}: text logit rel. error vs bf16 (first frame, mean over equal history)",
                  [round(errors[0], 4), round(sum(errors) / len(errors), 4)])

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
    header = ("impl", "weights", "sessions", "context_frames", "frame_ms_median", "frame_ms_p99", "encode_ms", "lm_ms", "decode_ms", "gpu_mem_gb")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[key]) for key in header))


KV_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


def use_fast_path(enabled: bool) -> None:
    """The fast path's kernels (Triton ring attention, compiled element-wise ops) or the readable ones."""
    lm_module.USE_FAST_KERNELS = enabled
    compile_elementwise(enabled)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for the JSON and PNG ($OUT by default)")
    parser.add_argument("--sessions", default="1,8,32,64", help="comma-separated batch sizes")
    parser.add_argument("--weights", default="bf16,int4,fp8", help="comma-separated weight formats (bf16 first: the reference)")
    parser.add_argument("--frames", type=int, default=100, help="timed frames per row (>= 100 for the report)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-upstream", action="store_true", help="skip upstream moshi")
    parser.add_argument("--kv", choices=sorted(KV_DTYPES), default="bf16", help="KV cache dtype")
    parser.add_argument("--no-eager", action="store_true", help="time only the fast (graphed) path")


def run(args: argparse.Namespace) -> int:
    args.sessions = [int(s) for s in str(args.sessions).split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("personaplex bench: error: the benchmark needs a CUDA GPU")
    bench = Bench(args)
    if not args.no_upstream:
        bench.guarded("moshi", bench.upstream)
    for weights in args.weights.split(","):
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
