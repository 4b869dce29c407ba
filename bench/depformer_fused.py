"""GPU benchmark of a frame's 8 depformer steps: readable, compiled (as the frame runner
compiles them), fused; then the fused kernel's launch shapes swept.

The depformer is full size (PersonaPlex's, random bf16 weights, or with --weights fp8 its
linears in fp8 as `--weights fp8` serves them) behind a one-layer temporal
transformer that is never run. Each variant's 8 steps (with the depformer_in product and the
token embeddings, as `LMModel.depformer_step` runs them) are captured in one CUDA graph,
so launch overhead counts as in the graphed frame; the table gives the median microseconds of
a replay (a frame's depformer) at B = 1, 8, 32, 64. The sweep times the fused steps alone
(`launch_fused_depformer_step` with each `LaunchShape`, 8 steps in a graph). With --phases,
each phase of the fused step is timed on the GPU's clock (`phase_ends`), steps launched one by
one outside a graph: a phase's cost is its last program's end minus the previous phase's last
end (the grid barrier included), its spread the last end minus the first. With --shape-ab
FIELD=VALUE, the fused steps alone with the default shape and with that field of it changed,
alternated three times (and with --phases, both timed per phase). Rows go to
$OUT/depformer-fused.json (default bench/results-local).

    PYTHONPATH=src python3 bench/depformer_fused.py [--no-sweep] [--rows 1 8] [--weights fp8] [--variants fused]
        [--phases] [--shape-ab FIELD=VALUE]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from graph_timing import graph_time_us  # bench/, the script's folder

from personaplex.model.config import LMConfig
from personaplex.model.kernels import register_cuda_ops
from personaplex.model.kernels.fused_depformer import (LaunchShape, launch_fused_depformer_step, on_cuda_cores,
                                                       step_phases)
from personaplex.model.layers import Kernels
from personaplex.model.lm import LMModel
from personaplex.model.quantize import quantize_model
from personaplex.model.random_init import build_random_lm

ROWS = (1, 8, 32, 64)
VARIANTS = {"readable": (Kernels(), False), "compiled": (Kernels.fast(), True),
            "fused": (Kernels(fused_depformer_max_rows=1 << 30), False)}
STEPS = 8
REPLAYS = 50


def frame_of_steps(lm: LMModel, rows: int, kernels: Kernels, compiled: bool) -> Callable[[], None]:
    """One frame's 8 depformer steps (compiled whole first if asked)."""
    hidden = torch.randn(rows, 1, lm.config.dim, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, lm.config.card, (rows, STEPS), device="cuda")
    state = lm.new_depformer_state(rows)

    def steps() -> None:
        for k in range(STEPS):
            lm.depformer_step(k, hidden, tokens[:, k], state, kernels)

    return torch.compile(steps, fullgraph=True, dynamic=False) if compiled else steps


def fused_steps(lm: LMModel, rows: int, shape: LaunchShape,
                phase_ends: torch.Tensor | None = None) -> Callable[[], None]:
    """The fused kernel alone for 8 steps, launched with `shape` (with `phase_ends`, [8, 2 x
    phases] int64, step k's phases are timed into row k)."""
    inputs = [lm.depformer_input(k, torch.randn(rows, 1, lm.config.dim, device="cuda", dtype=torch.bfloat16),
                                 torch.zeros(rows, dtype=torch.long, device="cuda"))[:, 0] for k in range(STEPS)]
    weights = [(lm.depformer_step_weights(k), lm.linears[k].weight) for k in range(STEPS)]
    scales = [lm.depformer_step_scales(k) for k in range(STEPS)]
    state = lm.new_depformer_state(rows)

    def steps() -> None:
        for k in range(STEPS):
            launch_fused_depformer_step(inputs[k], *weights[k], state.keys, state.values, k, lm.config.norm_eps,
                                        persistent=True, shape=shape, layer_scales=scales[k],
                                        phase_ends=None if phase_ends is None else phase_ends[k])

    return steps


def phase_costs(lm: LMModel, rows: int, shape: LaunchShape, repeats: int = 10) -> dict[str, dict[str, float]]:
    """Each kind of phase's cost and spread in the fused step at `rows` rows launched as
    `shape`, us (medians over the 8 steps of `repeats` frames, the first frame untimed). A
    step's first phase has no previous end: it is left out."""
    layers = lm.config.depformer_num_layers
    phases = step_phases(rows, layers)
    kinds = ["qkv", "out (attention inside)", "gate", "ffn"] if on_cuda_cores(rows) else ["qkv", "attend", "out", "gate",
                                                                                           "ffn"]
    ends = torch.empty(STEPS, 2 * phases, dtype=torch.int64, device="cuda")
    steps = fused_steps(lm, rows, shape, ends)
    costs, spreads = defaultdict(list), defaultdict(list)
    for frame in range(repeats + 1):
        steps()
        if frame == 0:
            continue
        for step_ends in ends.tolist():
            earliest, latest = step_ends[0::2], step_ends[1::2]
            for phase in range(1, phases):
                kind = "logits" if phase == phases - 1 else kinds[phase % len(kinds)]
                costs[kind].append((latest[phase] - latest[phase - 1]) / 1e3)
                spreads[kind].append((latest[phase] - earliest[phase]) / 1e3)
            costs["a step after its first phase"].append((latest[-1] - latest[0]) / 1e3)
    return {kind: {"us": statistics.median(values), **({"spread_us": statistics.median(spreads[kind])}
                                                       if kind in spreads else {})}
            for kind, values in costs.items()}


def frame_microseconds(steps: Callable[[], None]) -> float:
    """Median of REPLAYS timed replays of `steps` in a CUDA graph (after a few untimed ones)."""
    return graph_time_us([steps], replays=REPLAYS, untimed_replays=5)


def sweep_shapes(rows: int) -> list[LaunchShape]:
    """Programs per SM vary slowest: a shape that hung at its grid barrier (more programs than
    fit, were the occupancy rule wrong) would cost only the shapes after it."""
    if on_cuda_cores(rows):
        grid = itertools.product((1, 2, 4), (8, 16, 32), ((8192, 4), (16384, 8), (32768, 8)))
    else:
        grid = itertools.product((1, 2), (16, 32), ((4096, 4), (8192, 4), (8192, 8)))
    return [LaunchShape(block_n, tile, warps, per_sm) for per_sm, block_n, (tile, warps) in grid]


def sweep(lm: LMModel, rows: int) -> list[dict]:
    """Every launch shape at `rows` (a shape that fails to compile or launch is reported, not fatal)."""
    results = []
    for shape in sweep_shapes(rows):
        try:
            us = frame_microseconds(fused_steps(lm, rows, shape))
        except Exception as error:  # noqa: BLE001 -- a sweep reports every shape it could not run
            print(f"  rows {rows} {shape}: {type(error).__name__}: {str(error)[:200]}", flush=True)
            continue
        print(f"  rows {rows} {shape}: {us:.1f} us", flush=True)
        results.append({"rows": rows, "shape": dataclasses.asdict(shape), "us_per_frame": us})
    return results


def shapes_to_compare(rows: int, change: str) -> dict[str, LaunchShape]:
    """The default shape at `rows` ("") and it with FIELD=VALUE applied (named by the change)."""
    field, value = change.split("=")
    parsed = value == "True" if value in ("True", "False") else int(value)
    default = LaunchShape.for_rows(rows)
    return {"": default, change: dataclasses.replace(default, **{field: parsed})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-sweep", action="store_true", help="the variants' table only")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants to time (the compiled one takes a minute to compile)")
    parser.add_argument("--phases", action="store_true", help="also time each phase of the fused step")
    parser.add_argument("--shape-ab", metavar="FIELD=VALUE",
                        help="the default launch shape against it with one field changed (an int or True/False), alternated")
    parser.add_argument("--weights", choices=("bf16", "fp8"), default="bf16",
                        help="the depformer's weights (fp8: codes and row scales, logits heads in bf16)")
    args = parser.parse_args()
    register_cuda_ops()
    config = dataclasses.replace(LMConfig(dep_q=STEPS), num_layers=1)
    lm = build_random_lm(config, "cuda")
    if args.weights == "fp8":
        quantize_model(lm, "fp8")
    weight_bytes = sum(t.numel() * t.element_size() for name, t in [*lm.named_parameters(), *lm.named_buffers()]
                       if name.startswith(("depformer.", "depformer_in.", "linears.")))
    print(f"{torch.cuda.get_device_name()}: depformer weights {weight_bytes / 1e9:.2f} GB for {STEPS} steps")
    variants = {name: VARIANTS[name] for name in args.variants}
    print(f"{'rows':>5} " + " ".join(f"{name:>15}" for name in variants) + "   (us per frame: 8 steps)")
    out = Path(os.environ.get("OUT", "bench/results-local"))
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": STEPS,
              "weights": args.weights, "weight_bytes": weight_bytes, "results": [], "sweep": []}
    for rows in args.rows:
        times = {name: frame_microseconds(frame_of_steps(lm, rows, kernels, compiled))
                 for name, (kernels, compiled) in variants.items()}
        print(f"{rows:>5} " + " ".join(f"{times[name]:>15.1f}" for name in variants), flush=True)
        report["results"].append({"rows": rows, "us_per_frame": times, "default_shape":
                                  dataclasses.asdict(LaunchShape.for_rows(rows)),
                                  **({"fused_weight_GBps": weight_bytes / (times["fused"] * 1e-6) / 1e9}
                                     if "fused" in times else {})})
        (out / "depformer-fused.json").write_text(json.dumps(report, indent=1))
    for rows in args.rows if args.shape_ab else []:
        times = defaultdict(list)
        for _ in range(3):
            for name, shape in shapes_to_compare(rows, args.shape_ab).items():
                times[name].append(round(frame_microseconds(fused_steps(lm, rows, shape)), 1))
        print(f"  rows {rows} fused steps alone, us per frame: {dict(times)}", flush=True)
        report.setdefault("shape_ab", {})[rows] = dict(times)
        (out / "depformer-fused.json").write_text(json.dumps(report, indent=1))
    for rows in args.rows if args.phases else []:
        shapes = shapes_to_compare(rows, args.shape_ab) if args.shape_ab else {"": LaunchShape.for_rows(rows)}
        for name, shape in shapes.items():
            report.setdefault("phases" + (f" ({name})" if name else ""), {})[rows] = costs = phase_costs(lm, rows, shape)
            for kind, cost in costs.items():
                print(f"  rows {rows} {name} {kind:>28}: {cost['us']:7.2f} us" +
                      (f", spread {cost['spread_us']:.2f} us" if "spread_us" in cost else ""), flush=True)
        (out / "depformer-fused.json").write_text(json.dumps(report, indent=1))
    for rows in [] if args.no_sweep else args.rows:
        report["sweep"] += sweep(lm, rows)
        (out / "depformer-fused.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
