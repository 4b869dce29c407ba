"""GPU benchmark of the int4 tensor-core kernel (`kernels/int4_mma.py`) against the Triton int4
kernel and cuBLAS reading bf16, per LM linear shape and rows of x, with a sweep of its launch
shapes, and its error against float math on its own dequantized weights.

The gated feed-forwards' first products are also timed with the gate in the kernel's epilogue
(mma_frame_us, what a frame runs). Run on the GPU machine: `PYTHONPATH=src:bench python3 bench/int4_mma.py [--quick] [--rows 32,64]
[--shapes temporal|depformer|all] [--variants all|dequantized] [--stages 4,8,12] [--no-check] [--no-sweep]`
(--no-sweep: the table's launch shapes alone); writes
$OUT/int4_mma.json. Timing as bench/linear_kernels.py: each product inside a CUDA graph over
enough weight copies that they do not fit in L2, median of 15 replays.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from graph_timing import graph_time_us  # bench/, the script's folder

from personaplex.model.kernels import int4_mma
from personaplex.model.kernels.int4_mma import DEQUANTIZE_FROM_ROWS, MmaConfig, int4_mma_linear, to_fragment_order
from personaplex.model.kernels.quantized_matmul import WeightKind, quantized_linear
from personaplex.model.quantize import dequantize_affine, quantize_affine, unpack_codes

TEMPORAL_SHAPES = [(12288, 4096), (4096, 4096), (22528, 4096), (4096, 11264)]
DEPFORMER_SHAPES = [(1024, 4096), (3072, 1024), (1024, 1024), (5632, 1024), (1024, 2816)]
GATED_SHAPES = {(22528, 4096), (5632, 1024)}  # the gated feed-forwards' first products: also timed with the gate
ROWS = [1, 2, 8, 32, 64]
GROUP = 64
L2_FLUSH_BYTES = 160 * 2**20
OUT = Path(os.environ.get("OUT", "bench/results"))
QUICK = "--quick" in sys.argv
RESULTS: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

WARP_SHAPES = [(4, 1, 1), (8, 1, 1), (4, 1, 2), (2, 1, 2), (2, 2, 1), (4, 2, 1), (2, 4, 1), (1, 4, 1), (1, 4, 2),
               (2, 4, 2)]
# With weights dequantized in registers a warp holds no group or x sums: room for more strips.
DEQUANTIZED_WARP_SHAPES = WARP_SHAPES + [(4, 1, 4), (2, 1, 4), (8, 1, 2), (2, 2, 4)]
SPLITS = [1, 2, 4, 8]
MIN_BLOCKS = [0, 2, 3, 4]


def argument(flag: str, default: str) -> str:
    return sys.argv[sys.argv.index(flag) + 1] if flag in sys.argv else default


ROWS = [int(m) for m in argument("--rows", ",".join(map(str, ROWS))).split(",")]
# The LM's products swept: the temporal layers' (--quick's default), the depformer's, or all.
SHAPES = {"temporal": TEMPORAL_SHAPES, "depformer": DEPFORMER_SHAPES,
          "all": TEMPORAL_SHAPES + DEPFORMER_SHAPES}[argument("--shapes", "temporal" if QUICK else "all")]


def candidates() -> list[MmaConfig]:
    # Chunks in flight: fewer stages take less shared memory, so more blocks share an SM.
    stages = [int(s) for s in argument("--stages", "4" if QUICK else "4,8,12").split(",")]
    exact = [MmaConfig(wn, wk, s, st, sk) for (wn, wk, s), st, sk in itertools.product(WARP_SHAPES, stages, SPLITS)]
    dequantized = [MmaConfig(wn, wk, s, st, sk, dequantize=True, min_blocks=b)
                   for (wn, wk, s), st, sk, b in itertools.product(DEQUANTIZED_WARP_SHAPES, stages, SPLITS, MIN_BLOCKS)]
    swept = {"all": exact + dequantized, "dequantized": dequantized}[argument("--variants", "all")]
    # With K split, its sums added up in a cluster or by atomic adds.
    return [replace(c, cluster_sums=cluster) for c in swept for cluster in (True, False) if cluster or c.split_k > 1]


def save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "int4_mma.json").write_text(json.dumps(RESULTS, indent=1))


def copies_past_l2(bytes_each: int, most: int) -> int:
    """Copies of a weight of `bytes_each` bytes enough that together they do not fit in L2 (2
    to `most`): each product in a timed graph then reads its weights from memory."""
    return max(2, min(most, -(-L2_FLUSH_BYTES // bytes_each)))


def layer(n: int, k: int, seed: int = 0, gated: bool = False):
    torch.manual_seed(seed)
    w = torch.randn(n, k, device="cuda") * 0.02
    packed, scales, biases = quantize_affine(w, 4, GROUP)
    words, scale_bias = to_fragment_order(unpack_codes(packed, 4), scales, biases, gated=gated)
    return packed, scales, biases, words, scale_bias


# Two launch shapes of each variant (exact with scales once a group, dequantized weights), K's
# split summed in a cluster or by atomic adds.
CHECKED_CONFIGS = (MmaConfig(4, 1, 1, 4, 1), MmaConfig(2, 4, 2, 3, 4), MmaConfig(4, 1, 2, 4, 2, dequantize=True),
                   MmaConfig(2, 2, 1, 3, 4, dequantize=True, cluster_sums=False))


def correctness() -> None:
    """Worst relative error of a row against float64 math on the dequantized weights, at odd
    row counts and every group size; the Triton kernel's beside it."""
    rows = []
    for (n, k), group, m in itertools.product([(12288, 4096), (1024, 2816), (4096, 11264)], (32, 64, 128),
                                              (1, 3, 8, 17, 64, 100)):
        torch.manual_seed(m)
        w = torch.randn(n, k, device="cuda") * 0.02
        packed, scales, biases = quantize_affine(w, 4, group)
        words, scale_bias = to_fragment_order(unpack_codes(packed, 4), scales, biases)
        x = torch.randn(m, k, device="cuda").bfloat16()
        ref = x.double() @ dequantize_affine(packed, scales, biases, 4, group, torch.float64).T
        row_err = lambda out: ((out.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
        for config in CHECKED_CONFIGS:
            mma_err = row_err(int4_mma_linear(x, words, scale_bias, group, config))
            rows.append({"n": n, "k": k, "group": group, "m": m, "config": str(config), "mma": mma_err,
                         "dequantize": config.dequantize})
        try:
            rows[-1]["triton"] = row_err(quantized_linear(x, packed, scales, biases, WeightKind.INT4, group))
        except ValueError:  # a tiling the Triton kernels do not have (K = 11264 at group 128)
            rows[-1]["triton"] = None
        errors = " / ".join(f"{r['mma']:.2e}" for r in rows[-len(CHECKED_CONFIGS):])
        print(f"n={n} k={k} g={group} m={m}: mma {errors}, triton {rows[-1]['triton']}", flush=True)
    RESULTS["errors"] = rows
    for dequantize in (False, True):
        RESULTS[f"worst_mma_error_dequantize_{dequantize}"] = max(r["mma"] for r in rows if r["dequantize"] == dequantize)
    save()


def swept_at(config: MmaConfig, m: int) -> bool:
    """Whether a launch shape is timed at m rows of x: the dequantized variant only where it can
    pay (DEQUANTIZE_FROM_ROWS)."""
    return not config.dequantize or m >= DEQUANTIZE_FROM_ROWS


def time_shape(n: int, k: int, m: int, configs: list[MmaConfig]) -> dict[str, object]:
    gated = (n, k) in GATED_SHAPES
    layers = [layer(n, k, seed, gated) for seed in range(copies_past_l2(n * k // 2, 64))]
    x = torch.randn(m, k, device="cuda").bfloat16()
    bf16 = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(copies_past_l2(2 * n * k, 16))]
    row: dict[str, object] = {"n": n, "k": k, "m": m}
    row["bf16_us"] = graph_time_us([lambda w=w: F.linear(x, w) for w in bf16])
    del bf16
    row["triton_us"] = graph_time_us([lambda p=p: quantized_linear(x, p[0], p[1], p[2], WeightKind.INT4, GROUP)
                                      for p in layers])
    best = None
    for config in configs:
        if int4_mma.fit_split_k(config, k) != config or not swept_at(config, m):
            continue  # a shape the launch would change, or a variant not swept at these rows
        try:
            us = graph_time_us([lambda p=p: int4_mma_linear(x, p[3], p[4], GROUP, config) for p in layers], replays=7)
        except Exception as exc:  # a launch shape this GPU refuses (shared memory, registers)
            print("skip", config, str(exc)[:120], flush=True)
            continue
        if best is None or us < best[0]:
            best = (us, config)
    row["mma_default_us"] = graph_time_us([lambda p=p: int4_mma_linear(x, p[3], p[4], GROUP) for p in layers])
    # A frame's gated products: silu(a) * b in the kernel's epilogue, at the default launch shape.
    row["mma_frame_us"] = row["mma_default_us"] if not gated else graph_time_us(
        [lambda p=p: int4_mma_linear(x, p[3], p[4], GROUP, gated=True) for p in layers])
    if best is None:  # --no-sweep: the table's launch shapes alone
        best = (row["mma_default_us"], int4_mma.default_config(m, n, k))
    row["mma_us"], row["mma_config"] = best[0], list(best[1].__dict__.values())
    print(row, flush=True)
    return row


def precompile(configs: list[MmaConfig]) -> None:
    major, minor = torch.cuda.get_device_capability()
    tasks = {(int4_mma.x_tiles(m), c) for m in ROWS for c in configs if swept_at(c, m)}
    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:  # NVRTC runs outside the GIL
        list(pool.map(lambda task: int4_mma.kernel_cubin(task[0], task[1], GROUP, f"sm_{major}{minor}"), tasks))
    print(f"compiled {len(tasks)} kernels in {time.perf_counter() - start:.1f} s", flush=True)


def main() -> None:
    if "--no-check" not in sys.argv:
        correctness()
    configs = [] if "--no-sweep" in sys.argv else candidates()
    precompile(configs)
    rows = []
    for (n, k), m in itertools.product(SHAPES, ROWS):
        rows.append(time_shape(n, k, m, configs))
        RESULTS["shapes"] = rows
        save()
    # A frame's products: the temporal ones 32 layers of the four shapes; the depformer's 8
    # steps of 6 layers of the last four shapes, and each step's input product (the first).
    # mma_frame_us: the gated shapes with their gate (bf16 and the others without: a kernel more).
    per_frame = {"temporal": {shape: 32 for shape in TEMPORAL_SHAPES},
                 "depformer": {DEPFORMER_SHAPES[0]: 8} | {shape: 48 for shape in DEPFORMER_SHAPES[1:]}}
    for (part, counts), m in itertools.product(per_frame.items(), ROWS):
        per = [r for r in rows if r["m"] == m and (r["n"], r["k"]) in counts]
        if len(per) < len(counts):
            continue
        RESULTS[f"frame_{part}_ms_rows{m}"] = {col: sum(counts[r["n"], r["k"]] * r[col] for r in per) / 1000
                                               for col in ("bf16_us", "triton_us", "mma_us", "mma_default_us",
                                                           "mma_frame_us")}
        print(part, m, RESULTS[f"frame_{part}_ms_rows{m}"], flush=True)
    save()


if __name__ == "__main__":
    main()
