"""Each row's k-th largest probability, for top-k sampling without sorting.

Top-k sampling keeps a row's k most likely tokens: those whose probability is at least the
k-th largest. The readable sampler (`runtime/sampling.py`) finds that value by sorting the
row, a radix sort per sampled token (one text token and eight audio tokens a frame; on an
H200 the eight audio sorts of a one-row frame took 0.18 ms, bench/results/h200-profile.json
run K). Only the value is needed, and one program per row finds it exactly in registers:
non-negative float32 numbers order like their bit patterns read as integers, so the k-th
largest pattern is built from the top bit down, keeping each bit where at least k of the
row's patterns are at or above the prefix with that bit set.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A row is held in registers: 16 warps keep 32768 candidates (the text vocabulary) at 64 a thread.
WIDEST_ROW = 1 << 16


@triton.jit
def _kth_largest(values_ptr, k_ptr, out_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    inside = columns < width
    values = tl.load(values_ptr + row * width + columns, mask=inside, other=0.0)
    # Padding gets -1: below every non-negative pattern, so never counted.
    patterns = tl.where(inside, values.to(tl.int32, bitcast=True), -1)
    k = tl.minimum(tl.maximum(tl.load(k_ptr + row), 1), width)
    kth = tl.zeros((), dtype=tl.int32)
    for bit in tl.static_range(30, -1, -1):  # bit 31, the sign, is 0 for every non-negative value
        candidate = kth | (1 << bit)
        at_or_above = tl.sum((patterns >= candidate).to(tl.int32), axis=0)
        kth = tl.where(at_or_above >= k, candidate, kth)
    tl.store(out_ptr + row, kth.to(tl.float32, bitcast=True))


@torch.library.custom_op("personaplex::kth_largest", mutates_args=())
def kth_largest(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """values [B, V] float32, non-negative (probabilities); k [B] int64 (clamped to 1..V).
    Returns [B] float32: each row's k-th largest value."""
    rows, width = values.shape
    if values.dtype != torch.float32 or width > WIDEST_ROW:
        raise ValueError(f"kth_largest takes float32 rows of at most {WIDEST_ROW} values, not {values.dtype} x {width}")
    out = torch.empty(rows, device=values.device, dtype=torch.float32)
    block = triton.next_power_of_2(width)
    _kth_largest[(rows,)](values.contiguous(), k.contiguous(), out, width, BLOCK=block,
                          num_warps=4 if block <= 4096 else 16)
    return out


@kth_largest.register_fake
def _kth_largest_shape(values: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return values.new_empty(values.shape[0])
