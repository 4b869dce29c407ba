"""The fast path against the readable one at full size: the Triton ring attention
(`kernels/decode_attention.py`) against SDPA inside the LM's streaming path, over 64
teacher-forced frames (the kernel alone: test_fast_path.py).

In the LM the kernel serves single live frames on CUDA only, so the CPU variant compares
SDPA with itself: it proves the test, not the kernel.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.model.random_init import build_random_lm, compare_logits, random_codes, teacher_forced_logits
from tests.gpu.common import FRAMES, ROWS, SCALES, device_of, lm_config, record


# The readable forward with only the ring attention swapped for the Triton one: the
# comparison isolates the attention (the compiled, graphed frame is checked whole by
# test_fast_path.py).
RING_KERNEL = Kernels.fast()


# float32: the two attentions differ only in summation order; bf16: in where they round.
FAST_PATH_BOUNDS = {torch.float32: (1e-4, 0.99), torch.bfloat16: (2e-2, 0.9)}  # relative error, greedy agreement


def measure_streamed_logits(scale: str, dtype: torch.dtype, context: int) -> dict[str, float]:
    """The comparison of the test below; the model lives only here (a failing assertion keeps
    its frame's locals alive)."""
    config = dataclasses.replace(lm_config(scale), context=context)
    device = device_of(scale)
    lm = build_random_lm(config, device, dtype, "trained-like")
    codes = random_codes(config, FRAMES[scale], ROWS, device=device)
    readable = teacher_forced_logits(lm, codes, streaming=True, kernels=READABLE_KERNELS)
    fast = teacher_forced_logits(lm, codes, streaming=True, kernels=RING_KERNEL)
    return compare_logits(fast, readable)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("context", [3000, 24], ids=["ring-3000", "ring-24-wraps"])
def test_streamed_logits_with_ring_kernel_against_sdpa(scale: str, dtype: torch.dtype, context: int) -> None:
    """Teacher-forced logits of 64 streamed frames x 2 rows (16 on the CPU; KV ring, depformer
    steps), the Triton ring attention against SDPA. With a 24-frame context the ring (23
    slots) wraps at frame 23, so most frames attend over a full ring."""
    stats = measure_streamed_logits(scale, dtype, context)
    record(f"streamed logits, ring kernel vs SDPA, {dtype}, context {context} [{scale}]", stats)
    max_err, min_agree = FAST_PATH_BOUNDS[dtype]
    worst_factor = 1 if dtype == torch.float32 else 3
    for head in ("text", "audio"):
        assert stats[f"{head}_err"] < max_err and stats[f"{head}_worst"] < worst_factor * max_err, stats
        assert stats[f"{head}_agree"] >= min_agree, stats
