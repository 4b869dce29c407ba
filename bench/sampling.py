"""Top-k sampling of one token per row, timed in a CUDA graph at the frame's widths (2048 audio
candidates, 32000 text ones) and batch sizes: the readable sampler compiled whole (what a
frame without `Kernels.sampling` runs) and the sampler with the one-launch kernel
(`model/kernels/sampling.py`), both at 1 and 64 rows; and that kernel alone at each number of
warps. A frame samples once for its text token and once per audio token (eight).

    PYTHONPATH=src python3 bench/sampling.py   (writes $OUT/sampling.json)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import graph_time_us  # noqa: E402

from personaplex.model.kernels import register_cuda_ops  # noqa: E402
from personaplex.model.kernels.sampling import default_warps, launch_sample_top_k  # noqa: E402
from personaplex.model.layers import READABLE_KERNELS, Kernels  # noqa: E402
from personaplex.runtime.sampling import RowNoise, sample_tokens  # noqa: E402

WARPS = (2, 4, 8, 16, 32)
SAMPLERS = (("readable_compiled_us", READABLE_KERNELS), ("kernel_sampler_us", Kernels(sampling=True)))
COMPILED_ROWS = (1, 64)  # each sampler compiles per shape: a few batch sizes only


def main() -> None:
    register_cuda_ops()
    torch._dynamo.config.cache_size_limit = 64
    results = []
    for width in (2048, 32000):
        for rows in (1, 8, 32, 64, 150):
            logits = 4 * torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
            temperature = torch.full((rows,), 0.8, device="cuda")
            top_k = torch.full((rows,), 250 if width == 2048 else 25, device="cuda")
            noise = RowNoise(rows, "cuda")
            keys = noise.next_keys()
            row = {"width": width, "rows": rows, "default_warps": default_warps(width)}
            for label, kernels in SAMPLERS if rows in COMPILED_ROWS else ():
                sampler = torch.compile(lambda k=kernels: sample_tokens(logits, temperature, top_k, noise, k), fullgraph=True)
                row[label] = round(graph_time_us([sampler] * 8), 2)
            for warps in WARPS:
                row[f"kernel_{warps}_warps_us"] = round(
                    graph_time_us([lambda w=warps: launch_sample_top_k(logits, temperature, top_k, keys, w)] * 8), 2)
            results.append(row)
            print(row, flush=True)
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling.json").write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                  "rows": results}, indent=1))


if __name__ == "__main__":
    main()
