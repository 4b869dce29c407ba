"""GPU micro-benchmark of the ring-attention kernel (`model/kernels/ring_attention.py`) over
its launch shapes, at the calls a frame makes: the LM's live frame at early and full context
(B = 1, 32, 64; bf16 and fp8 rings), Mimi's transformer call and a depformer step.

Each case times every launch shape in a CUDA graph of 20 calls (median of several replays),
so launch overhead is counted as in the graphed frame, and reports microseconds per call and
the GB/s of ring bytes read (the filled slots' keys and values). Rows go to
$OUT/<card>-ring-attention.json.

    PYTHONPATH=src python3 bench/ring_attention_sweep.py [--launches quick|medium|full] [--label NAME]

Rows are rewritten after every case, so a run cut short by its time limit keeps what it timed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

from graph_timing import graph_time_us  # bench/, the script's folder

from personaplex.model.kernels.ring_attention import DEFAULT_LAUNCH, RingLaunch, choose_split, launch_ring_attention

# name: (rows, heads, new steps, slots, head dim, ring dtype, activation dtype, newest position)
CASES = {
    "lm B=1 early bf16": (1, 32, 1, 2999, 128, torch.bfloat16, torch.bfloat16, 41),
    "lm B=1 full bf16": (1, 32, 1, 2999, 128, torch.bfloat16, torch.bfloat16, 3 * 2999 + 5),
    "lm B=32 full bf16": (32, 32, 1, 2999, 128, torch.bfloat16, torch.bfloat16, 3 * 2999 + 5),
    "lm B=64 early fp8": (64, 32, 1, 2999, 128, torch.float8_e4m3fn, torch.bfloat16, 41),
    "lm B=64 full fp8": (64, 32, 1, 2999, 128, torch.float8_e4m3fn, torch.bfloat16, 3 * 2999 + 5),
    "mimi B=1": (1, 8, 2, 249, 64, torch.float32, torch.float32, 3 * 249 + 5),
    "mimi B=64": (64, 8, 2, 249, 64, torch.float32, torch.float32, 3 * 249 + 5),
    "depformer B=1 last step": (1, 16, 1, 8, 64, torch.bfloat16, torch.bfloat16, 7),
}
CALLS_PER_GRAPH = 20


def launches(grid: str) -> list[RingLaunch]:
    if grid == "quick":
        return [DEFAULT_LAUNCH, RingLaunch(split=256), RingLaunch(split=512), RingLaunch(block=64)]
    if grid == "long":  # splits longer than `choose_split` offers (up to the whole ring: no merge)
        return [RingLaunch(split, block) for split in (512, 1024, 2048, 4096) for block in (32, 64)]
    if grid == "medium":  # 12 shapes: every split, the two smaller tiles, both warp counts
        shapes = itertools.product((128, 256, 512), (32, 64), (4, 8), (3,))
    else:
        shapes = itertools.product((128, 256, 512), (32, 64, 128), (4, 8), (2, 3))
    return [RingLaunch(split, block, warps, stages) for split, block, warps, stages in shapes]


def time_case(case: tuple, launch: RingLaunch) -> float:
    """Microseconds per call, from a CUDA graph of CALLS_PER_GRAPH calls."""
    rows, heads, steps, slots, head_dim, ring_dtype, dtype, newest = case
    q, new_keys, new_values = (torch.randn(rows, heads, steps, head_dim, device="cuda", dtype=dtype) for _ in range(3))
    keys, values = (torch.randn(rows, heads, slots, head_dim, device="cuda", dtype=torch.bfloat16).to(ring_dtype)
                    for _ in range(2))
    first = torch.full((rows,), newest - (steps - 1), device="cuda")
    call = lambda: launch_ring_attention(q, new_keys, new_values, keys, values, first, launch)  # noqa: E731
    return graph_time_us([call] * CALLS_PER_GRAPH, replays=7, untimed_replays=0)


def ring_bytes(case: tuple) -> int:
    rows, heads, _, slots, head_dim, ring_dtype, _, newest = case
    filled = min(newest + 1, slots)
    return 2 * rows * heads * filled * head_dim * torch.tensor([], dtype=ring_dtype).element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", choices=("quick", "medium", "long", "full"), default="full",
                        help="quick: the default and three neighbours; medium: 12 shapes; long: splits "
                        "of 512 to 4096 slots; full: 36")
    parser.add_argument("--label", default="", help="names the kernel's version in the rows and the file name")
    args = parser.parse_args()
    card = torch.cuda.get_device_name()
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{card.replace(' ', '_')}-ring-attention{'-' + args.label if args.label else ''}.json"
    rows = []
    for name, case in CASES.items():
        batch, heads, _, slots = case[:4]
        chosen = replace(DEFAULT_LAUNCH, split=choose_split(batch, heads, slots, torch.device("cuda")))
        results = []
        for launch in launches(args.launches):
            try:
                micros = time_case(case, launch)
            except Exception as error:  # noqa: BLE001 - a launch shape the card cannot run (resources)
                print(f"{name} {launch}: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
                continue
            row = {"case": name, **asdict(launch), "us": round(micros, 2),
                   "ring_gb_per_s": round(ring_bytes(case) / micros / 1e3, 1), "default": launch == chosen,
                   "label": args.label, "card": card, "torch": torch.__version__}
            results.append(row)
        results.sort(key=lambda row: row["us"])
        if not results:
            continue
        default = next((row for row in results if row["default"]), None)
        print(f"{name}: default {default and default['us']} us; best {results[0]['us']} us with "
              f"{ {k: results[0][k] for k in ('split', 'block', 'num_warps', 'num_stages')} }, "
              f"{results[0]['ring_gb_per_s']} GB/s of ring")
        rows.extend(results)
        path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
