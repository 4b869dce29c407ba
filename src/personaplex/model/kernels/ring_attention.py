"""Attention of a call's few new steps over a ring of cached keys, writing their keys first (Triton).

Three streaming attentions have the same shape: a live LM frame (1 query over a ring of
context - 1 = 2999 slots), a Mimi transformer call (2 queries, 25 Hz steps, 249 slots) and a
depformer step (1 query over the frame's 8 codebook steps). In each, the T new steps'
keys/values are written to their slots (slot = position % slots) and then every query q
sees the slots whose newest position p satisfies 0 <= p <= q. The readable code does that
with a scatter per cache, a mask over every slot and SDPA: several launches per layer, and
reads of the whole ring even when a conversation is 10 s old.

This kernel does it in one launch (two when the ring is split, as the LM's is):
- slots fill from 0 until the ring wraps, so only the first min(last + 1, slots) are read,
  split over several programs per head so that one query still fills the GPU;
- one program per query and split; the first split's programs store their step's key/value,
  and the new steps are read from the inputs (by the program whose split holds their slot),
  never from the cache, so no program waits for another. Every other filled slot holds an
  older position, which all of the call's queries see: no per-slot position arithmetic;
- with several splits, a second small kernel merges the partial softmaxes.
Keys and values may be stored in float8 (e4m3): they are read as they are, and the new ones
are rounded to the cache's type before they are used, as the readable path reads them back.
Shapes are static and nothing synchronises with the host, so it is CUDA-graph safe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

@dataclass(frozen=True)
class RingLaunch:
    """How the kernel is launched: slots per program (`split`), slots per inner iteration
    (`block`, capped at the ring's size), Triton's warps and pipeline stages. The default is
    what run F measured; `bench/ring_attention_sweep.py` times the alternatives."""

    split: int = 256
    block: int = 64
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_LAUNCH = RingLaunch()


@triton.jit
def _ring_attention_split(
    q_ptr, new_k_ptr, new_v_ptr, k_ptr, v_ptr, last_ptr, out_ptr, acc_ptr, max_ptr, sum_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    heads, capacity, splits, scale,
    STEPS: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr, ONE_SPLIT: tl.constexpr,
):
    """One program: one query (row, head, step) over one split of the ring. Every tile is 2-D
    ([BLOCK slots, HEAD_DIM]), as Triton lays those out best; a call's T queries are T programs
    that read the same slots (T is 1 or 2, and the rings they share are small)."""
    row = tl.program_id(0)
    head = tl.program_id(1) // STEPS
    step = tl.program_id(1) % STEPS
    split = tl.program_id(2)
    last = tl.load(last_ptr + row)  # position of the call's newest step
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, tl.minimum(last + 1, capacity))
    dims = tl.arange(0, HEAD_DIM)
    first_position = last - (STEPS - 1)  # >= 0: every new step has a position
    query_position = first_position + step
    cache_type = k_ptr.dtype.element_ty
    # 64-bit: from 175 rows (x 32 heads x 2999 slots x 128) a ring's offset passes 2^31.
    ring = (row * heads + head).to(tl.int64) * capacity * HEAD_DIM
    new_k_base = new_k_ptr + row * stride_kb + head * stride_kh
    new_v_base = new_v_ptr + row * stride_vb + head * stride_vh
    if split == 0:  # this query's own step goes into the ring, rounded as the cache stores it
        slot = query_position % capacity
        tl.store(k_ptr + ring + slot * HEAD_DIM + dims, tl.load(new_k_base + step * stride_kt + dims).to(cache_type))
        tl.store(v_ptr + ring + slot * HEAD_DIM + dims, tl.load(new_v_base + step * stride_vt + dims).to(cache_type))
    q = tl.load(q_ptr + row * stride_qb + head * stride_qh + step * stride_qt + dims).to(tl.float32) * scale

    running_max = -float("inf")
    running_sum = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    # The new steps first, from the inputs: the program of the split holding a step's slot
    # counts it if the query may see it (its own step and the ones before). Every slot not
    # written by this call holds an older position, which every query of the call sees.
    for t in tl.static_range(STEPS):
        slot = (first_position + t) % capacity
        counted = (slot >= start) & (slot < end) & (t <= step)
        new_k = tl.load(new_k_base + t * stride_kt + dims).to(cache_type).to(tl.float32)
        new_v = tl.load(new_v_base + t * stride_vt + dims).to(cache_type).to(tl.float32)
        score = tl.where(counted, tl.sum(q * new_k, axis=0), float("-inf"))
        new_max = tl.maximum(running_max, score)
        finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        weight = tl.exp(score - finite_max)
        correction = tl.exp(running_max - finite_max)
        acc = acc * correction + weight * new_v
        running_sum = running_sum * correction + weight
        running_max = new_max
    for first in range(start, end, BLOCK):
        slots = first + tl.arange(0, BLOCK)
        visible = slots < end
        for t in tl.static_range(STEPS):  # the new steps' slots were counted above
            visible &= slots != (first_position + t) % capacity
        offsets = ring + slots[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_ptr + offsets, mask=visible[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=visible[:, None], other=0.0).to(tl.float32)
        scores = tl.where(visible, tl.sum(k * q[None, :], axis=1), float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        # A query that has seen nothing yet keeps max -inf: subtract 0 instead (its weights are 0).
        finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        weights = tl.exp(scores - finite_max)
        correction = tl.exp(running_max - finite_max)
        acc = acc * correction + tl.sum(weights[:, None] * v, axis=0)
        running_sum = running_sum * correction + tl.sum(weights, axis=0)
        running_max = new_max

    query = (row * heads + head) * STEPS + step
    if ONE_SPLIT:  # every query sees at least its own key: the sum is > 0
        tl.store(out_ptr + query * HEAD_DIM + dims, (acc / running_sum).to(out_ptr.dtype.element_ty))
    else:
        partial = ((row * heads + head) * splits + split) * STEPS + step
        tl.store(acc_ptr + partial * HEAD_DIM + dims, acc)
        tl.store(max_ptr + partial, running_max)
        tl.store(sum_ptr + partial, running_sum)


@triton.jit
def _merge_splits(acc_ptr, max_ptr, sum_ptr, out_ptr, splits,
                  STEPS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """out[row, head, step] from the splits' partial softmaxes (a split that saw nothing has
    max -inf and sum 0, and weighs 0)."""
    row_head = tl.program_id(0)
    step = tl.program_id(1)
    split = tl.arange(0, SPLITS_PAD)
    split_ok = split < splits
    dims = tl.arange(0, HEAD_DIM)
    partial = (row_head * splits + split) * STEPS + step
    maxes = tl.load(max_ptr + partial, mask=split_ok, other=float("-inf"))
    sums = tl.load(sum_ptr + partial, mask=split_ok, other=0.0)
    acc = tl.load(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None], other=0.0)
    weights = tl.exp(maxes - tl.max(maxes, axis=0))
    out = tl.sum(acc * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
    tl.store(out_ptr + (row_head * STEPS + step) * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty))


# A custom op, so that torch.compile treats the kernel as one opaque call with a known output
# shape when it compiles the whole frame (`FrameRunner`), instead of tracing its launch.
@torch.library.custom_op("personaplex::ring_attention", mutates_args=("keys", "values"))
def ring_attention(q: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, last_position: torch.Tensor) -> torch.Tensor:
    """q, new_keys, new_values [B, H, T, D] of the steps at positions last_position[b] - T + 1
    .. last_position[b] (int64 [B], >= T - 1); keys/values [B, H, slots, D] contiguous rings.

    Stores the new keys/values at slot position % slots, then returns [B, H, T, D] in q's
    dtype: softmax(q k^T / sqrt(D)) v over the slots whose newest position is at most the
    query's (slot s holds position last - ((last - s) mod slots); negative: never written)."""
    return launch_ring_attention(q, new_keys, new_values, keys, values, last_position, DEFAULT_LAUNCH)


def launch_ring_attention(q: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, last_position: torch.Tensor, launch: RingLaunch) -> torch.Tensor:
    """`ring_attention` with a given launch shape (the op always takes the default)."""
    batch, heads, steps, head_dim = q.shape
    capacity = keys.shape[2]
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("ring_attention needs contiguous key and value rings")
    q, new_keys, new_values = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, new_keys, new_values))
    splits = triton.cdiv(capacity, launch.split)
    out = torch.empty(batch, heads, steps, head_dim, device=q.device, dtype=q.dtype)
    partials = (batch, heads, splits, steps)
    acc = torch.empty(*partials, head_dim, device=q.device, dtype=torch.float32) if splits > 1 else out
    maxes = torch.empty(partials, device=q.device, dtype=torch.float32) if splits > 1 else out
    sums = torch.empty_like(maxes) if splits > 1 else out
    _ring_attention_split[(batch, heads * steps, splits)](
        q, new_keys, new_values, keys, values, last_position.contiguous(), out, acc, maxes, sums,
        *q.stride()[:3], *new_keys.stride()[:3], *new_values.stride()[:3],
        heads, capacity, splits, head_dim**-0.5,
        STEPS=steps, HEAD_DIM=head_dim, SPLIT=launch.split,
        BLOCK=min(launch.block, triton.next_power_of_2(capacity)), ONE_SPLIT=splits == 1,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    if splits > 1:
        _merge_splits[(batch * heads, steps)](
            acc, maxes, sums, out, splits,
            STEPS=steps, SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=head_dim,
        )
    return out


@ring_attention.register_fake
def _ring_attention_shape(q: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
                          keys: torch.Tensor, values: torch.Tensor, last_position: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, device=q.device, dtype=q.dtype)
