"""The k-th largest probability of top-k sampling, by sorting (the readable sampler) and by
the kernel of `model/kernels/top_k.py`, timed in a CUDA graph at the frame's widths (2048
audio candidates, 32000 text ones) and batch sizes. A frame finds it once for its text token
and once per audio token (eight).

    PYTHONPATH=src python3 bench/top_k.py   (writes $OUT/top_k.json)
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
from personaplex.model.layers import READABLE_KERNELS, Kernels  # noqa: E402
from personaplex.runtime.sampling import kth_largest_probability  # noqa: E402


def main() -> None:
    register_cuda_ops()
    rows_out = []
    for width in (2048, 32000):
        for rows in (1, 8, 32, 64, 150):
            probs = torch.softmax(3 * torch.randn(rows, width, device="cuda"), dim=-1)
            top_k = torch.full((rows,), 250, device="cuda")
            row = {"width": width, "rows": rows}
            for label, kernels in (("sort_us", READABLE_KERNELS), ("kernel_us", Kernels(kth_largest=True))):
                row[label] = round(graph_time_us([lambda k=kernels: kth_largest_probability(probs, top_k, k)] * 8), 2)
            rows_out.append(row)
            print(row, flush=True)
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "top_k.json").write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                                                "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
