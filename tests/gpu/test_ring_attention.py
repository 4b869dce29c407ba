"""The fast path against the readable one: the Triton ring attention (`kernels/decode_attention.py`)
against SDPA, alone and inside the LM's streaming path over 64 teacher-forced frames.

In the LM the kernel serves single live frames on CUDA only, so the CPU variant of the
model-level test compares SDPA with itself (it proves the test, not the kernel); the
kernel-level test runs the kernel itself in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from personaplex.model import lm as lm_module
from personaplex.model.random_init import build_random_lm, compare_logits, random_codes, teacher_forced_logits
from tests.gpu.common import FRAMES, ROWS, SCALES, device_of, interpreter_or_skip, lm_config, record


@contextmanager
def ring_attention_kernel(enabled: bool) -> Iterator[None]:
    """Run the LM with (True) or without (False) the Triton ring attention for live frames."""
    saved = lm_module.USE_FAST_KERNELS
    lm_module.USE_FAST_KERNELS = enabled
    try:
        yield
    finally:
        lm_module.USE_FAST_KERNELS = saved


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_decode_attention_kernel_against_sdpa(scale: str, dtype: torch.dtype) -> None:
    """One query per row over the first `lengths[b]` slots of its ring: a new conversation,
    one a few frames in, a ring one short of full and a full (wrapped) ring."""
    interpreter_or_skip(scale)
    from personaplex.model.kernels.decode_attention import decode_attention

    device = device_of(scale)
    capacity, heads = (3000, 32) if scale == "cuda" else (300, 2)
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(4, heads, 1, 128, device=device, generator=generator).to(dtype)
    keys = torch.randn(4, heads, capacity, 128, device=device, generator=generator).to(dtype)
    values = torch.randn(4, heads, capacity, 128, device=device, generator=generator).to(dtype)
    lengths = torch.tensor([1, 57, capacity - 1, capacity], device=device)
    out = decode_attention(q, keys, values, lengths)
    for row, length in enumerate(lengths.tolist()):
        expected = F.scaled_dot_product_attention(
            q[row : row + 1].double(), keys[row : row + 1, :, :length].double(), values[row : row + 1, :, :length].double())
        error = ((out[row : row + 1].double() - expected).norm() / expected.norm()).item()
        record(f"ring attention kernel vs float64 SDPA, {length} of {capacity} slots, {dtype} [{scale}]", {"rel_err": error})
        # float32: the kernel's own arithmetic; bf16: the rounding of its output.
        assert error < (1e-5 if dtype == torch.float32 else 1e-2), (length, error)


# float32: the two attentions differ only in summation order; bf16: in where they round.
FAST_PATH_BOUNDS = {torch.float32: (1e-4, 0.99), torch.bfloat16: (2e-2, 0.9)}  # relative error, greedy agreement


def measure_streamed_logits(scale: str, dtype: torch.dtype, context: int) -> dict[str, float]:
    """The comparison of the test below; the model lives only here (a failing assertion keeps
    its frame's locals alive)."""
    config = dataclasses.replace(lm_config(scale), context=context)
    device = device_of(scale)
    lm = build_random_lm(config, device, dtype, "trained-like")
    codes = random_codes(config, FRAMES[scale], ROWS, device=device)
    with ring_attention_kernel(False):
        readable = teacher_forced_logits(lm, codes, streaming=True)
    with ring_attention_kernel(True):
        fast = teacher_forced_logits(lm, codes, streaming=True)
    return compare_logits(fast, readable)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("context", [3000, 24], ids=["ring-3000", "ring-24-wraps"])
def test_streamed_logits_with_ring_kernel_against_sdpa(scale: str, dtype: torch.dtype, context: int) -> None:
    """Teacher-forced logits of 64 streamed frames x 2 rows (16 on the CPU; KV ring, depformer
    steps), the Triton ring attention against SDPA. With a 24-frame context the ring wraps at
    frame 24, so most frames attend over a full ring."""
    stats = measure_streamed_logits(scale, dtype, context)
    record(f"streamed logits, ring kernel vs SDPA, {dtype}, context {context} [{scale}]", stats)
    max_err, min_agree = FAST_PATH_BOUNDS[dtype]
    worst_factor = 1 if dtype == torch.float32 else 3
    for head in ("text", "audio"):
        assert stats[f"{head}_err"] < max_err and stats[f"{head}_worst"] < worst_factor * max_err, stats
        assert stats[f"{head}_agree"] >= min_agree, stats
