"""One int4 product for Nsight Compute: the table's launch shape, another launch shape, then
cuBLAS on the same weights in bf16, each three times (profile the third of each).

Run on the GPU machine (run AF's profile, `h200-int4-wgmma-rejected.json`; its wgmma rows came from
the rejected variant, which is not in the tree; run AH's stall reasons, `h200-runAH.json`, with
`--set full -o REPORT`, then `ncu -i REPORT --page details --print-details all`):

    PYTHONPATH=src:bench ncu --clock-control none -k regex:int4_mma --launch-skip 2 --launch-count 4 --section SpeedOfLight \\
        --section Occupancy --section SchedulerStats python3 bench/ncu_int4.py 12288 4096 64 4,1,2,4,4,True,0,False
    ncu --clock-control none -k regex:'nvjet|gemm' --launch-skip 2 --launch-count 1 ... (the same program)

Arguments: N K rows, then the other launch shape as MmaConfig's fields in order.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from int4_mma import GROUP, layer  # bench/, the script's folder

from personaplex.model.kernels.int4_mma import MmaConfig, default_config, int4_mma_linear
from personaplex.model.quantize import dequantize_affine


def field(text: str) -> int | bool:
    return text == "True" if text in ("True", "False") else int(text)


def main(n: int, k: int, rows: int, other: MmaConfig) -> None:
    packed, scales, biases, words, scale_bias = layer(n, k)
    x = torch.randn(rows, k, device="cuda").bfloat16()
    for config in (default_config(rows, n, k), other):
        print(config, flush=True)
        for _ in range(3):
            int4_mma_linear(x, words, scale_bias, GROUP, config)
    bf16_weights = dequantize_affine(packed, scales, biases, 4, GROUP, torch.bfloat16)
    for _ in range(3):
        F.linear(x, bf16_weights)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), MmaConfig(*map(field, sys.argv[4].split(","))))
