"""Where a frame's time goes, at the full 7B shape on this GPU (random weights).

For each case (rows B, kernels, the frame compiled or as written) the frame runs without
its CUDA graph under torch.profiler: GPU time per kernel family (what a graph replay runs
too: the graph only removes launch gaps), the number of kernels, and the host-side time per
frame with the top CPU ops (what an ungraphed frame pays on top). The graphed frame's own
time is measured by replay for comparison.

    PYTHONPATH=src python3 bench/profile_frame.py --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from personaplex.bench import build_lm, build_mimi, make_persona
from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.runtime.runner import FrameRunner

FAMILIES = [  # first match wins
    ("depformer step (fused, Triton)", r"_depformer_step"),
    ("attention (ring, Triton)", r"_ring_attention_split|_merge_splits|_partial_attention"),
    # Inductor names its kernels after the ops they fuse ("..._softmax_...", "..._ring_attention_..."):
    # they are taken as compiled element-wise work before any name-based family.
    ("compiled element-wise (Triton)", r"^triton_"),
    ("attention (SDPA)", r"flash|fmha|attention|softmax"),
    ("convolution", r"conv|implicit|winograd|nchwToNhwc|nhwcToNchw"),
    ("matmul", r"gemm|gemv|cutlass|sm90_|nvjet|matmul|_quantized|dequant|int4_mma"),
    ("top-k / sort", r"sort|topk|radix|bitonic|gather_topk"),
    ("reductions", r"reduce"),
    ("copies / fills", r"copy|memcpy|memset|fill|cat|index|scatter|gather"),
    ("element-wise", r"elementwise|vectorized|unrolled|launch_kernel"),
]


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def warmed_runner(lm, mimi, persona, batch: int, use_graphs: bool, kernels=None, compile_frame: bool = False,
                  tuning: str = "default"):
    """A runner with every row joined, warmed up: (runner, user pcm, listening mask)."""
    runner = FrameRunner(lm, mimi, batch, use_graphs=use_graphs, kernels=kernels, compile_frame=compile_frame,
                         compile_tuning=tuning)
    for row in range(batch):
        runner.join(row, persona)
    pcm = 0.1 * torch.randn(batch, 1920, device="cuda")
    speaking = torch.zeros(batch, dtype=torch.bool, device="cuda")
    with torch.no_grad():
        for _ in range(5):
            runner.run(pcm, speaking)
    return runner, pcm, speaking


def profile_case(lm, mimi, persona, batch: int, kernels, label: str, compile_frame: bool = False, frames: int = 5,
                 trace: Path | None = None, tuning: str = "default", graphed: bool = True) -> dict:
    runner, pcm, speaking = warmed_runner(lm, mimi, persona, batch, False, kernels, compile_frame, tuning)
    with torch.no_grad():
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(frames):
            runner.run(pcm, speaking)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / frames
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(frames):
                runner.run(pcm, speaking)
            torch.cuda.synchronize()
    if trace is not None:  # every kernel of one frame in launch order, to place each in the frame
        with profile(activities=[ProfilerActivity.CUDA]) as one_frame:
            runner.run(pcm, speaking)
            torch.cuda.synchronize()
        write_kernel_sequence(one_frame, trace)
    gpu_us: dict[str, float] = defaultdict(float)
    kernel_us: dict[str, tuple[float, float]] = {}  # kernel name: (GPU us, launches) per frame
    kernels_per_frame = 0
    cpu_ops: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        device_us = getattr(event, "self_device_time_total", 0) or getattr(event, "self_cuda_time_total", 0)
        if event.device_type == torch.autograd.DeviceType.CUDA:
            gpu_us[family(event.key)] += device_us / frames
            kernels_per_frame += event.count / frames
            kernel_us[event.key] = (device_us / frames, event.count / frames)
        elif event.key.startswith("aten::"):
            cpu_ops[event.key] += event.self_cpu_time_total / frames
    result = {
        "case": label, "rows": batch, "wall_ms_per_frame": round(wall_ms, 2),
        "gpu_ms_per_frame": round(sum(gpu_us.values()) / 1e3, 2), "kernels_per_frame": round(kernels_per_frame),
        "gpu_ms_by_family": {k: round(v / 1e3, 3) for k, v in sorted(gpu_us.items(), key=lambda kv: -kv[1])},
        "top_cpu_ops_ms": {k: round(v / 1e3, 2) for k, v in sorted(cpu_ops.items(), key=lambda kv: -kv[1])[:12]},
        # The 25 kernels that take longest: [ms per frame, launches per frame] (names cut at 90 characters)
        "top_kernels": {name[:90]: [round(us / 1e3, 3), round(count, 1)] for name, (us, count)
                        in sorted(kernel_us.items(), key=lambda kv: -kv[1][0])[:25]},
    }
    del runner, prof  # the graphed runner below needs what this one holds (64 rows: a 94 GB KV cache)
    torch.cuda.empty_cache()
    if graphed and kernels is not READABLE_KERNELS:
        result["graphed_ms_per_frame"] = graphed_time(lm, mimi, persona, batch, compile_frame, kernels, tuning=tuning)
        torch.cuda.empty_cache()
    return result


def write_kernel_sequence(prof, path: Path) -> None:
    """One line per kernel in the order it ran: start (us from the first), duration (us), name."""
    kernels = sorted((event.time_range.start, event.time_range.elapsed_us(), event.name)
                     for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)
    first = kernels[0][0] if kernels else 0
    path.write_text("".join(f"{start - first:.1f}\t{us:.1f}\t{name[:160]}\n" for start, us, name in kernels))


def graphed_time(lm, mimi, persona, batch: int, compile_frame: bool, kernels: Kernels, frames: int = 50,
                 tuning: str = "default") -> float:
    runner, pcm, speaking = warmed_runner(lm, mimi, persona, batch, True, kernels, compile_frame, tuning)
    with torch.no_grad():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(frames):
            runner.run(pcm, speaking)
        end.record()
        end.synchronize()
    return round(start.elapsed_time(end) / frames, 2)


def variant_kernels(variant: str) -> Kernels:
    """"fast": Kernels.fast(); "no-FIELD": the same with FIELD off."""
    if variant == "fast":
        return Kernels.fast()
    field = variant.removeprefix("no-")
    return dataclasses.replace(Kernels.fast(), **{field: type(getattr(Kernels.fast(), field))()})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--rows", default="1,32")
    parser.add_argument("--cases", default="readable,as-written,compiled",
                        help="which frames to profile: readable (B=1 only), as-written, compiled")
    parser.add_argument("--weights", default="bf16", help="the LM's weight format: bf16, fp8, int4 or int8")
    parser.add_argument("--variants", default="fast",
                        help="the compiled cases' kernels: fast (Kernels.fast()) and/or no-FIELD, Kernels.fast() "
                             "with that field off (e.g. no-conv_products), comma-separated, one case each")
    parser.add_argument("--tunings", default="default",
                        help="the compiled cases' compile tunings (runtime/runner.py: COMPILE_TUNINGS), comma-separated, "
                             "one case each per variant")
    parser.add_argument("--sequence", action="store_true",
                        help="also write each compiled case's kernels in launch order (kernels-ROWS-WEIGHTS.tsv)")
    parser.add_argument("--no-graphed", action="store_true",
                        help="skip each case's graphed frame time (a second runner): at 64 rows its 94 GB KV cache "
                             "did not fit beside what the profiled runner left allocated (run AD)")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    lm, _ = build_lm(args.weights, torch.device("cuda"))
    mimi = build_mimi(torch.device("cuda"))
    persona, _ = make_persona(lm)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def add(result: dict) -> None:  # written case by case: a run cut short keeps what it measured
        result["weights"] = args.weights
        results.append(result)
        print(json.dumps(result), flush=True)
        (out / f"profile-{args.weights}-{torch.cuda.get_device_name().replace(' ', '_')}.json").write_text(json.dumps(results, indent=1))

    if "readable" in cases:
        add(profile_case(lm, mimi, persona, 1, READABLE_KERNELS, "eager, readable kernels"))
    for rows in (int(r) for r in args.rows.split(",")):
        if "as-written" in cases:
            add(profile_case(lm, mimi, persona, rows, Kernels.fast(), "as written, Triton ring attention",
                             graphed=not args.no_graphed))
        if "compiled" not in cases:
            continue
        for variant, tuning in itertools.product(args.variants.split(","), args.tunings.split(",")):
            suffix = ("" if variant == "fast" else f"-{variant}") + ("" if tuning == "default" else f"-{tuning}")
            sequence = out / f"kernels-{rows}-{args.weights}{suffix}.tsv" if args.sequence else None
            add(profile_case(lm, mimi, persona, rows, variant_kernels(variant), f"compiled frame{suffix}",
                             compile_frame=True, trace=sequence, tuning=tuning, graphed=not args.no_graphed))


if __name__ == "__main__":
    main()
