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
- the program of the first split stores the new keys/values, and every program reads the new
  steps' slots from the inputs rather than the cache, so no program waits for another;
- with several splits, a second small kernel merges the partial softmaxes.
Keys and values may be stored in float8 (e4m3): they are read as they are, and the new ones
are rounded to the cache's type before they are used, as the readable path reads them back.
Shapes are static and nothing synchronises with the host, so it is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SPLIT = 256  # slots per program
_BLOCK = 64  # slots per inner iteration


@triton.jit
def _load_steps(ptr, stride_b, stride_h, stride_t, row, head, steps, step_ok, dims):
    """[STEPS_PAD, HEAD_DIM] of a [B, H, T, D] tensor (last dimension contiguous) at (row, head)."""
    offsets = row * stride_b + head * stride_h + steps[:, None] * stride_t + dims[None, :]
    return tl.load(ptr + offsets, mask=step_ok[:, None], other=0.0)


@triton.jit
def _ring_attention_split(
    q_ptr, new_k_ptr, new_v_ptr, k_ptr, v_ptr, last_ptr, out_ptr, acc_ptr, max_ptr, sum_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    heads, capacity, splits, scale,
    STEPS: tl.constexpr, STEPS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK: tl.constexpr, ONE_SPLIT: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    last = tl.load(last_ptr + row)  # position of the call's newest step
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, tl.minimum(last + 1, capacity))
    dims = tl.arange(0, HEAD_DIM)
    steps = tl.arange(0, STEPS_PAD)
    step_ok = steps < STEPS
    step_positions = last - (STEPS - 1) + steps  # >= 0: every new step has a position
    new_slots = step_positions % capacity
    cache_type = k_ptr.dtype.element_ty
    # The new keys/values as the cache stores them (rounded to float8 where it is float8).
    new_k = _load_steps(new_k_ptr, stride_kb, stride_kh, stride_kt, row, head, steps, step_ok, dims).to(cache_type)
    new_v = _load_steps(new_v_ptr, stride_vb, stride_vh, stride_vt, row, head, steps, step_ok, dims).to(cache_type)
    ring = (row * heads + head) * capacity * HEAD_DIM
    if split == 0:
        new_offsets = ring + new_slots[:, None] * HEAD_DIM + dims[None, :]
        tl.store(k_ptr + new_offsets, new_k, mask=step_ok[:, None])
        tl.store(v_ptr + new_offsets, new_v, mask=step_ok[:, None])
    new_k = new_k.to(tl.float32)
    new_v = new_v.to(tl.float32)
    q = _load_steps(q_ptr, stride_qb, stride_qh, stride_qt, row, head, steps, step_ok, dims).to(tl.float32) * scale

    running_max = tl.full([STEPS_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([STEPS_PAD], tl.float32)
    acc = tl.zeros([STEPS_PAD, HEAD_DIM], tl.float32)
    for first in range(start, end, BLOCK):
        slots = first + tl.arange(0, BLOCK)
        in_range = slots < end
        offsets = ring + slots[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_ptr + offsets, mask=in_range[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=in_range[:, None], other=0.0).to(tl.float32)
        for t in tl.static_range(STEPS):  # the new steps' slots: from the inputs, not the cache
            written = (slots == (last - (STEPS - 1) + t) % capacity)[:, None]
            k = tl.where(written, tl.sum(tl.where(steps[:, None] == t, new_k, 0.0), axis=0)[None, :], k)
            v = tl.where(written, tl.sum(tl.where(steps[:, None] == t, new_v, 0.0), axis=0)[None, :], v)
        # Newest position held by each slot (capacity is added so that % sees no negative number).
        key_positions = last - (last - slots + capacity) % capacity
        visible = in_range[None, :] & (key_positions[None, :] <= step_positions[:, None])
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # A query that has seen nothing yet keeps max -inf: subtract 0 instead (its weights are 0).
        finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        weights = tl.exp(scores - finite_max[:, None])
        correction = tl.exp(running_max - finite_max)
        acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * v[None, :, :], axis=1)
        running_sum = running_sum * correction + tl.sum(weights, axis=1)
        running_max = new_max

    if ONE_SPLIT:  # every query sees at least its own key: the sum is > 0
        out_offsets = ((row * heads + head) * STEPS + steps)[:, None] * HEAD_DIM + dims[None, :]
        tl.store(out_ptr + out_offsets, (acc / running_sum[:, None]).to(out_ptr.dtype.element_ty), mask=step_ok[:, None])
    else:
        partial = ((row * heads + head) * splits + split) * STEPS + steps
        tl.store(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], acc, mask=step_ok[:, None])
        tl.store(max_ptr + partial, running_max, mask=step_ok)
        tl.store(sum_ptr + partial, running_sum, mask=step_ok)


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
    batch, heads, steps, head_dim = q.shape
    capacity = keys.shape[2]
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("ring_attention needs contiguous key and value rings")
    q, new_keys, new_values = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, new_keys, new_values))
    splits = triton.cdiv(capacity, _SPLIT)
    out = torch.empty(batch, heads, steps, head_dim, device=q.device, dtype=q.dtype)
    partials = (batch, heads, splits, steps)
    acc = torch.empty(*partials, head_dim, device=q.device, dtype=torch.float32) if splits > 1 else out
    maxes = torch.empty(partials, device=q.device, dtype=torch.float32) if splits > 1 else out
    sums = torch.empty_like(maxes) if splits > 1 else out
    _ring_attention_split[(batch, heads, splits)](
        q, new_keys, new_values, keys, values, last_position.contiguous(), out, acc, maxes, sums,
        *q.stride()[:3], *new_keys.stride()[:3], *new_values.stride()[:3],
        heads, capacity, splits, head_dim**-0.5,
        STEPS=steps, STEPS_PAD=triton.next_power_of_2(steps), HEAD_DIM=head_dim, SPLIT=_SPLIT,
        BLOCK=min(_BLOCK, triton.next_power_of_2(capacity)), ONE_SPLIT=splits == 1,
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
