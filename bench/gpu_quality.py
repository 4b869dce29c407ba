"""Every fidelity number of the weight formats and the fast path, on this GPU, in one command.

Runs the GPU tests (`tests/gpu`, marker `gpu`: Triton kernels per layer, format error per
layer, whole-LM teacher-forced logits of fp8/int8/int4 against bf16 for Gaussian and
trained-like weights, MLX folders through from_pretrained, ring attention kernel vs SDPA)
and writes everything they measured to $OUT/gpu_quality.json (OUT defaults to ./bench_out),
then prints it as a table. The exit status is pytest's: 0 when every stated bound holds.

    PYTHONPATH=src python3 bench/gpu_quality.py [extra pytest arguments]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def print_table(path: Path) -> None:
    report = json.loads(path.read_text())
    print(f"\n{report['device']}, torch {report['torch']}")
    for name, values in report["records"].items():
        print(f"{name}\n    " + "  ".join(f"{key}={value}" for key, value in values.items()))


def main(argv: list[str]) -> int:
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    path = (out / "gpu_quality.json").resolve()
    path.unlink(missing_ok=True)
    os.environ["PERSONAPLEX_QUALITY_JSON"] = str(path)
    os.chdir(ROOT)
    status = pytest.main(["-m", "gpu", "tests/gpu", "-q", "-p", "no:cacheprovider", *argv])
    if path.exists():
        print_table(path)
        print(f"\nwritten: {path}")
    return int(status)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
