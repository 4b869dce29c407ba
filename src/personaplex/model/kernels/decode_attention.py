"""Attention of one new frame over the filled slots of the KV ring (flash-decoding, Triton).

A live frame's query attends to every cached key of its row: the ring's context - 1 slots
hold exactly the frames NVIDIA's reference lets it see (`kv_cache.ring_capacity`), so there
is no slot to skip. The readable path does that with SDPA and a mask over all 2999 slots, so it reads the whole cache even when a conversation is 10 s old. This kernel
reads only the first `lengths[b]` slots of row b (slots fill from 0 until the ring wraps),
splitting them over several programs per head so that one query still fills the GPU; a small
reduction then merges the partial softmaxes. Shapes are static, so it is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SPLIT = 256  # slots per program
_BLOCK = 64  # slots per inner iteration


@triton.jit
def _partial_attention(
    q_ptr, k_ptr, v_ptr, lengths_ptr, acc_ptr, max_ptr, sum_ptr,
    heads, capacity, splits, scale,
    HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(lengths_ptr + row)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, length)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (row * heads + head) * HEAD_DIM + dims).to(tl.float32) * scale
    kv_base = (row * heads + head) * capacity * HEAD_DIM
    running_max = -float("inf")
    running_sum = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for first in range(start, end, BLOCK):
        slots = first + tl.arange(0, BLOCK)
        valid = slots < end
        offsets = kv_base + slots[:, None] * HEAD_DIM + dims[None, :]
        k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1)
        scores = tl.where(valid, scores, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=0))
        weights = tl.exp(scores - new_max)
        correction = tl.exp(running_max - new_max)
        v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * correction + tl.sum(weights[:, None] * v, axis=0)
        running_sum = running_sum * correction + tl.sum(weights, axis=0)
        running_max = new_max
    out = (row * heads + head) * splits + split
    tl.store(acc_ptr + out * HEAD_DIM + dims, acc)
    tl.store(max_ptr + out, running_max)
    tl.store(sum_ptr + out, running_sum)


# A custom op, so that torch.compile treats the kernel as one opaque call with a known output
# shape when it compiles the whole frame (`FrameRunner`), instead of tracing its launch.
@torch.library.custom_op("personaplex::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """q [B, H, 1, D]; keys/values [B, H, capacity, D] (contiguous); lengths [B] int64 in
    1..capacity: softmax(q k^T / sqrt(D)) v over slots [0, lengths[b]). Returns [B, H, 1, D]."""
    batch, heads, _, head_dim = q.shape
    capacity = keys.shape[2]
    splits = triton.cdiv(capacity, _SPLIT)
    acc = torch.empty(batch, heads, splits, head_dim, device=q.device, dtype=torch.float32)
    maxes = torch.empty(batch, heads, splits, device=q.device, dtype=torch.float32)
    sums = torch.empty_like(maxes)
    _partial_attention[(batch, heads, splits)](
        q.contiguous(), keys, values, lengths, acc, maxes, sums,
        heads, capacity, splits, head_dim**-0.5,
        HEAD_DIM=head_dim, SPLIT=_SPLIT, BLOCK=_BLOCK,
    )
    # Merge the splits: splits past a row's length saw nothing (max -inf, sum 0) and weigh 0.
    overall = maxes.amax(dim=2, keepdim=True)
    weights = torch.exp(maxes - overall)
    out = (acc * weights[..., None]).sum(dim=2) / (sums * weights).sum(dim=2)[..., None]
    return out[:, :, None].to(q.dtype)


@decode_attention.register_fake
def _decode_attention_shape(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)
