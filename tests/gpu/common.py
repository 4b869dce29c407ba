"""What the fidelity tests share: the two scales each runs at, and the record of what they measured.

A test parametrized over SCALES runs twice: "cpu-small" (a small LM on the CPU: it runs in
the normal suite and proves the test itself) and "cuda-full" (the 7B shape on a CUDA GPU,
marker `gpu`, skipped without one). `pytest -m gpu tests/gpu` runs the GPU half; with the environment
variable PERSONAPLEX_QUALITY_JSON set, every number a test measured is written to that file
(`bench/gpu_quality.py` does both).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from personaplex.model.config import LMConfig

CUDA = torch.cuda.is_available()
if not CUDA and importlib.util.find_spec("triton") is not None:
    # Without a GPU the CPU variants run the Triton kernels in Triton's interpreter, which is
    # chosen when a kernel is defined: set before any test imports the kernel modules.
    os.environ.setdefault("TRITON_INTERPRET", "1")
GPU_ONLY = (pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: this variant runs the full 7B shape"))
SCALES = [pytest.param("cpu", id="cpu-small"), pytest.param("cuda", id="cuda-full", marks=GPU_ONLY)]

FRAMES = {"cuda": 64, "cpu": 16}  # teacher-forced frames per row (the CPU ones only prove the test)
ROWS = 2  # batch rows: two conversations in lockstep, as the batched serving path runs them

# name -> measured numbers, filled by `record` and written by conftest.py at the end of the session.
RECORDS: dict[str, dict[str, object]] = {}


def record(name: str, values: dict[str, object]) -> None:
    RECORDS[name] = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in values.items()}
    print(name, RECORDS[name])


def lm_config(scale: str) -> LMConfig:
    """The 7B shape as the engine loads it (the agent's 8 depformer steps) on CUDA; on the CPU a
    small LM with the same structure, every linear input a multiple of 64 (the int4 groups)."""
    if scale == "cuda":
        return LMConfig(dep_q=8)
    return LMConfig(dim=128, num_heads=1, num_layers=2, hidden_scale=4.5, dep_q=8, text_card=1024, depformer_dim=128,
                    depformer_num_heads=1, depformer_num_layers=2, depformer_dim_feedforward=576)


def device_of(scale: str) -> torch.device:
    return torch.device("cuda" if scale == "cuda" else "cpu")


def interpreter_or_skip(scale: str) -> None:
    """The CPU variant of a kernel test needs Triton's interpreter; skip (saying why) without it."""
    if scale == "cuda":
        return
    if CUDA:
        pytest.skip("CUDA is present: the kernels are tested there (the interpreter would replace them process-wide)")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the CPU variant runs the Triton kernels in Triton's interpreter: install triton")
    if np.lib.NumpyVersion(np.__version__) >= "2.4.0" and _triton_version() < (3, 9):
        pytest.skip("Triton's interpreter before 3.9 fails with numpy >= 2.4 (int() of a 1-element array)")


def _triton_version() -> tuple[int, ...]:
    from importlib.metadata import version

    return tuple(int(part) for part in version("triton").split(".")[:2])


class GemvRows(TorchDispatchMode):
    """Records how many rows of x each call of the GEMV's ops (`personaplex::quantized_linear`, and
    `personaplex::quantized_gated_linear` with the gate in its epilogue) takes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in ("personaplex::quantized_linear", "personaplex::quantized_gated_linear"):
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))
