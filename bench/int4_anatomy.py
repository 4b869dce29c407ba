"""Where the int4 tensor-core kernel's time goes at many rows: one product's time as K grows
with the launch shape fixed (the slope is the cost of a chunk of 64 inputs, the intercept the
fixed cost of a launch: pipeline fill, sums added up, the extra kernels of atomic sums), and as
K's split changes; cuBLAS reading bf16 beside each.

Run on the GPU machine: `PYTHONPATH=src:bench python3 bench/int4_anatomy.py [N] [ROWS]`
(default 12288 64); writes $OUT/int4_anatomy.json. Timing as bench/int4_mma.py.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from graph_timing import graph_time_us  # bench/, the script's folder
from int4_mma import GROUP, copies_past_l2, layer

from personaplex.model.kernels.int4_mma import default_config, int4_mma_linear

OUT = Path(os.environ.get("OUT", "bench/results"))


def main(n: int, rows: int) -> None:
    results: dict[str, object] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "n": n,
                                  "rows": rows, "tuned_k": 4096}
    tuned = default_config(rows, n, 4096)
    results["config"] = list(tuned.__dict__.values())
    timings = []
    for k in (1024, 2048, 4096, 8192):
        x = torch.randn(rows, k, device="cuda").bfloat16()
        layers = [layer(n, k, seed)[3:] for seed in range(copies_past_l2(n * k // 2, 64))]  # (words, scale_bias)
        bf16 = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(copies_past_l2(2 * n * k, 16))]
        row = {"k": k, "bf16_us": graph_time_us([lambda w=w: F.linear(x, w) for w in bf16])}
        for split in (1, 2, 4, 8):
            config = replace(tuned, split_k=split)
            if k % (split * 64):
                continue
            row[f"split{split}_us"] = graph_time_us(
                [lambda p=p: int4_mma_linear(x, p[0], p[1], GROUP, config) for p in layers])
        print(row, flush=True)
        timings.append(row)
        del layers, bf16
    results["timings"] = timings
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "int4_anatomy.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 12288, int(sys.argv[2]) if len(sys.argv) > 2 else 64)
