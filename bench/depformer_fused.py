"""GPU benchmark of a frame's 8 depformer steps: readable, readable + ring attention, fused.

The depformer is full size (PersonaPlex's, random bf16 weights) behind a one-layer temporal
transformer that is never run. Each variant's 8 steps (with the depformer_in product and the
token embeddings, as `LMModel.depformer_step` runs them) are captured in one CUDA graph,
so launch overhead counts as in the graphed frame; the table gives the median microseconds of
a replay (a frame's depformer) at B = 1, 8, 32, 64, and the rows go to
$OUT/depformer-fused.json (default bench/results-local).

    PYTHONPATH=src python3 bench/depformer_fused.py
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

import torch

from personaplex.model.config import LMConfig
from personaplex.model.kernels import register_cuda_ops
from personaplex.model.layers import Kernels
from personaplex.model.lm import LMModel
from personaplex.model.random_init import build_random_lm

ROWS = (1, 8, 32, 64)
VARIANTS = {"readable": Kernels(), "ring attention": Kernels.fast(), "fused": Kernels(fused_depformer=True)}
STEPS = 8
REPLAYS = 50


def frame_of_steps(lm: LMModel, rows: int, kernels: Kernels) -> torch.cuda.CUDAGraph:
    """A CUDA graph of one frame's 8 depformer steps, warmed up on a side stream first."""
    hidden = torch.randn(rows, 1, lm.config.dim, device="cuda", dtype=torch.bfloat16)
    tokens = torch.randint(0, lm.config.card, (rows, STEPS), device="cuda")
    state = lm.new_depformer_state(rows)

    def steps() -> None:
        for k in range(STEPS):
            lm.depformer_step(k, hidden, tokens[:, k], state, kernels)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        steps()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steps()
    return graph


def replay_microseconds(graph: torch.cuda.CUDAGraph) -> float:
    """Median of REPLAYS timed replays (after a few untimed ones)."""
    for _ in range(5):
        graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def main() -> None:
    register_cuda_ops()
    config = dataclasses.replace(LMConfig(dep_q=STEPS), num_layers=1)
    lm = build_random_lm(config, "cuda")
    weight_bytes = sum(p.numel() * p.element_size() for name, p in lm.named_parameters()
                       if name.startswith(("depformer.", "depformer_in.", "linears.")))
    print(f"{torch.cuda.get_device_name()}: depformer weights {weight_bytes / 1e9:.2f} GB for {STEPS} steps")
    print(f"{'rows':>5} " + " ".join(f"{name:>15}" for name in VARIANTS) + "   (us per frame: 8 steps)")
    results = []
    for rows in ROWS:
        times = {name: replay_microseconds(frame_of_steps(lm, rows, kernels)) for name, kernels in VARIANTS.items()}
        print(f"{rows:>5} " + " ".join(f"{times[name]:>15.1f}" for name in VARIANTS))
        results.append({"rows": rows, "us_per_frame": times,
                        "fused_weight_GBps": weight_bytes / (times["fused"] * 1e-6) / 1e9})
    out = Path(os.environ.get("OUT", "bench/results-local"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "depformer-fused.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": STEPS,
         "weight_bytes": weight_bytes, "results": results}, indent=1))


if __name__ == "__main__":
    main()
