"""Attention of a call's few new steps over a ring of cached keys, writing their keys first (Triton).

Three streaming attentions have the same shape: a live LM frame (1 query over a ring of
context - 1 = 2999 slots), a Mimi transformer call (2 queries, 25 Hz steps, 249 slots) and a
depformer step (1 query over the frame's 8 codebook steps). In each, the T new steps'
keys/values are written to their slots (slot = position % slots) and then every query q
sees the slots whose newest position p satisfies 0 <= p <= q. The readable code does that
with a scatter per cache, a mask over every slot and SDPA: several launches per layer, and
reads of the whole ring even when a conversation is 10 s old.

This kernel does it in one launch:
- slots fill from 0 until the ring wraps, so only the first min(last + 1, slots) are read,
  split over several programs per head so that one conversation still fills the GPU (a split
  the ring has not reached returns at once);
- one program per (row, head, split) takes the call's queries together as a tile and runs
  the products on the tensor cores, as flash attention does: the loads feeding them are
  pipelined, and no step of the loop reduces across warps (the CUDA-core loop it replaced
  read the ring at 2.5 TB/s, this one a bf16 ring at 4.2 on an H200, an fp8 one at 2.7);
- the products are transposed (the ring's tiles are their first operand), so that an fp8
  ring's tiles are converted in the registers that feed the tensor cores: 9 % faster on fp8
  rings than the other order, within 3 % on bf16 ones (run H, `h200-ring-attention.json`);
- the first split's program stores the new keys/values, and the new steps are read from the
  inputs (by the program whose split holds their slot), never from the cache, so no program
  waits for another. Every other filled slot holds an older position, which all of the
  call's queries see: no per-slot position arithmetic;
- with several splits, the last of a (row, head)'s splits to store its partial softmax merges
  them all (a counter per (row, head), which that program resets), where a second kernel did;
- given the call's RoPE tables (cos and sin of each step's angles), it rotates the queries and
  the new keys itself as it loads them, so that q, k and v come straight from the projection's
  output (views, no copy): the rotation kernels the compiled frame ran before every attention
  (three small launches a layer) are gone.
Keys and values may be stored in float8 (e4m3): they are read as they are, and the new ones
are rounded to the cache's type before they are used, as the readable path reads them back.
Shapes are static and nothing synchronises with the host, so it is CUDA-graph safe.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import device_index, multiprocessors

@dataclass(frozen=True)
class RingLaunch:
    """How the kernel is launched: slots per program (`split`; None: `choose_split`), slots
    per inner iteration (`block`), Triton's warps and pipeline stages. The default is the best
    of run G's sweep (`bench/ring_attention_sweep.py`) at the frame's calls."""

    split: int | None = None
    block: int = 32
    num_warps: int = 4
    num_stages: int = 3


DEFAULT_LAUNCH = RingLaunch()
SPLITS = (4096, 2048, 1024, 512, 256, 128)  # the splits `choose_split` picks from, largest first
# The tensor cores take tiles of at least 16 along every side: a call's queries (1 or 2) are
# padded to 16 rows, a block holds at least 16 slots and a head's dims are padded to 16.
QUERY_TILE = 16


def choose_split(rows: int, heads: int, capacity: int, device: torch.device) -> int:
    """The largest split that still gives every SM two programs: fewer, longer splits leave
    fewer partial softmaxes to merge and each program's pipeline runs longer (LM, fp8 ring,
    B=64, full context: 597 us at 512 slots, 542 at 4096, the whole ring with no merge; B=32
    bf16: 369 -> 354), but one conversation's 32 heads need short ones to fill the card (B=1:
    16.6 us at 256, 22 at 512, 77 at 4096). Run H's sweep, `h200-ring-attention.json`.
    On the CPU (Triton's interpreter) the smallest, so that the tests run the merge."""
    if device.type == "cuda":
        wanted = 2 * multiprocessors(device_index(device))
        for split in SPLITS:
            if rows * heads * triton.cdiv(capacity, split) >= wanted:
                return split
    return SPLITS[-1]


@triton.jit
def _wrapped(slot, capacity):
    """slot % capacity for 0 <= slot < 2 * capacity, without a division."""
    return tl.where(slot >= capacity, slot - capacity, slot)


@triton.jit
def _absorb(scores, values, running_max, running_sum, acc):
    """One online-softmax step, transposed: the [n, QUERIES] scores (-inf where unseen) and
    the [D, n] values into each query's running max, sum and [D, QUERIES] weighted sum."""
    new_max = tl.maximum(running_max, tl.max(scores, axis=0))
    # A query that has seen nothing yet keeps max -inf: subtract 0 instead (its weights are 0).
    finite_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    weights = tl.exp(scores - finite_max[None, :])
    correction = tl.exp(running_max - finite_max)
    acc = acc * correction[None, :] + tl.dot(values, weights.to(values.dtype), input_precision="tf32x3")
    return new_max, running_sum * correction + tl.sum(weights, axis=0), acc


@triton.jit
def _rotated(ptr, offsets, partners, mask, cos_ptr, sin_ptr, angle_offsets, dims, ROPE: tl.constexpr):
    """The tile at ptr + offsets as float32, rotated by RoPE if asked and rounded back to the
    tensor's dtype, as the readable `layers.rope` leaves it. RoPE turns each (even, odd) pair of
    dims by the step's angle: even' = even cos - odd sin, odd' = odd cos + even sin, i.e. each dim
    d takes its partner d ^ 1 (at `partners`) times -sin (even d) or +sin (odd d)."""
    x = tl.load(ptr + offsets, mask=mask, other=0.0)
    if ROPE:
        partner = tl.load(ptr + partners, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + angle_offsets, mask=mask, other=0.0)
        sin = tl.load(sin_ptr + angle_offsets, mask=mask, other=0.0)
        signed_sin = tl.where((dims % 2) == 0, -sin, sin)
        x = (x.to(tl.float32) * cos + partner * signed_sin).to(ptr.dtype.element_ty)
    return x


@triton.jit
def _ring_attention_split(
    q_ptr, new_k_ptr, new_v_ptr, k_ptr, v_ptr, first_ptr, cos_ptr, sin_ptr, out_ptr, acc_ptr, max_ptr, sum_ptr,
    tickets_ptr, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_rb, stride_rt, heads, capacity, splits, scale,
    STEPS: tl.constexpr, QUERIES: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_TILE: tl.constexpr, SPLIT: tl.constexpr,
    SPLITS_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ONE_SPLIT: tl.constexpr, ROPE: tl.constexpr, PRODUCT_TYPE: tl.constexpr,
):
    """One program: a call's STEPS queries of one (row, head) over one split of the ring, as the
    first columns of a [D, QUERIES = 16] tile (the smallest the tensor cores take; the other
    columns are zeros that are never stored). The products are transposed, so that the ring's
    tiles are their first operand, converted in registers as they are loaded: scores^T =
    keys @ q^T and out^T = values^T @ weights^T, in PRODUCT_TYPE (`_product_type`); float32
    products run as three TF32 ones ("tf32x3"), as exact as float32 to ~1e-6.
    With ROPE the queries and new keys are rotated as they load (`_rotated`; cos and sin
    [B, STEPS, HEAD_DIM / 2], rows and steps strided by stride_rb, stride_rt).
    A split the ring has not reached yet has nothing to do: the merge skips it. With several
    splits, each stores its partial softmax and counts itself in at tickets[row, head]; the one
    that counts last merges the partials into the output and sets the count back to 0."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    # Positions fit in 32 bits (2^31 frames = 5 years), so the slot arithmetic stays 32-bit.
    first_position = tl.load(first_ptr + row).to(tl.int32)  # position of the call's first step
    last = first_position + (STEPS - 1)  # and of its newest
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, tl.minimum(last + 1, capacity))
    if start >= end:  # never split 0: it holds the newest step at least
        return
    dims = tl.arange(0, DIM_TILE)  # HEAD_DIM padded to a power of 2 and >= 16, for the tensor cores
    dim_ok = dims < HEAD_DIM
    steps = tl.arange(0, QUERIES)
    is_step = steps < STEPS
    step_ok = is_step[:, None] & dim_ok[None, :]  # [steps, dims]
    column_ok = dim_ok[:, None] & is_step[None, :]  # [dims, steps]
    cache_type = k_ptr.dtype.element_ty
    # 64-bit: from 175 rows (x 32 heads x 2999 slots x 128) a ring's offset passes 2^31.
    ring = (row * heads + head).to(tl.int64) * capacity * HEAD_DIM
    first_slot = first_position % capacity  # the new steps' slots follow, wrapping at capacity
    new_slots = _wrapped(first_slot + steps, capacity)
    # Each (step, dim)'s RoPE angle, as [steps, dims] and [dims, steps] offsets into cos and sin.
    angles = row * stride_rb + steps[:, None] * stride_rt + (dims // 2)[None, :]
    angles_t = row * stride_rb + steps[None, :] * stride_rt + (dims // 2)[:, None]
    key_rows = row * stride_kb + head * stride_kh + steps[:, None] * stride_kt
    new_keys = _rotated(new_k_ptr, key_rows + dims[None, :], key_rows + (dims ^ 1)[None, :], step_ok, cos_ptr, sin_ptr,
                        angles, dims[None, :], ROPE).to(cache_type)
    new_values = tl.load(new_v_ptr + row * stride_vb + head * stride_vh + steps[None, :] * stride_vt + dims[:, None],
                         mask=column_ok, other=0.0).to(cache_type)  # [dims, steps]
    if split == 0:  # the new steps go into the ring, rounded as the cache stores them
        tl.store(k_ptr + ring + new_slots[:, None] * HEAD_DIM + dims[None, :], new_keys, mask=step_ok)
        tl.store(v_ptr + ring + new_slots[None, :] * HEAD_DIM + dims[:, None], new_values, mask=column_ok)
    query_columns = row * stride_qb + head * stride_qh + steps[None, :] * stride_qt
    q = _rotated(q_ptr, query_columns + dims[:, None], query_columns + (dims ^ 1)[:, None], column_ok, cos_ptr,
                 sin_ptr, angles_t, dims[:, None], ROPE).to(PRODUCT_TYPE)  # q^T [dims, steps]

    running_max = tl.full([QUERIES], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([QUERIES], dtype=tl.float32)
    acc = tl.zeros([DIM_TILE, QUERIES], dtype=tl.float32)
    # The new steps first, from the inputs: the program of the split holding a step's slot
    # counts it for the queries that may see it (their own step and the ones before). Every
    # slot not written by this call holds an older position, which every query of the call sees.
    counted = is_step & (new_slots >= start) & (new_slots < end)
    seen = counted[:, None] & (steps[:, None] <= steps[None, :])  # [new step, query]
    new_scores = tl.dot(new_keys.to(PRODUCT_TYPE), q, input_precision="tf32x3") * scale
    running_max, running_sum, acc = _absorb(tl.where(seen, new_scores, float("-inf")), new_values.to(PRODUCT_TYPE),
                                            running_max, running_sum, acc)
    for first in range(start, end, BLOCK):
        slots = first + tl.arange(0, BLOCK)
        visible = slots < end
        for t in tl.static_range(STEPS):  # the new steps' slots were counted above
            visible &= slots != _wrapped(first_slot + t, capacity)
        keys = tl.load(k_ptr + ring + slots[:, None] * HEAD_DIM + dims[None, :],
                       mask=visible[:, None] & dim_ok[None, :], other=0.0).to(PRODUCT_TYPE)  # [slots, dims]
        values = tl.load(v_ptr + ring + slots[None, :] * HEAD_DIM + dims[:, None],
                         mask=dim_ok[:, None] & visible[None, :], other=0.0).to(PRODUCT_TYPE)  # [dims, slots]
        scores = tl.dot(keys, q, input_precision="tf32x3") * scale  # [slots, queries]
        running_max, running_sum, acc = _absorb(tl.where(visible[:, None], scores, float("-inf")), values,
                                                running_max, running_sum, acc)

    if ONE_SPLIT:  # every query sees at least its own key: the sum is > 0
        out = acc / running_sum[None, :]
        tl.store(out_ptr + _output_rows(row, head, steps, heads, STEPS)[None, :] * HEAD_DIM + dims[:, None],
                 out.to(out_ptr.dtype.element_ty),
                 mask=column_ok)
    else:
        partials = ((row * heads + head) * splits + split) * STEPS + steps
        tl.store(acc_ptr + partials[None, :] * HEAD_DIM + dims[:, None], acc, mask=column_ok)
        tl.store(max_ptr + partials, running_max, mask=is_step)
        tl.store(sum_ptr + partials, running_sum, mask=is_step)
        # Every thread's stores issued, one count for the program: a release, so whoever counts
        # last sees all of them (an acquire), and reads them from L2.
        tl.debug_barrier()
        ticket_ptr = tickets_ptr + row * heads + head
        counted = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
        reached = tl.cdiv(tl.minimum(last + 1, capacity), SPLIT)
        if counted == reached - 1:
            for step in tl.static_range(STEPS):
                _merge_step(acc_ptr, max_ptr, sum_ptr, out_ptr, row, head, step, heads, splits, reached, STEPS,
                            SPLITS_PAD, HEAD_DIM, DIM_TILE)
            tl.store(ticket_ptr, 0)  # as the next call expects it


@triton.jit
def _output_rows(row, head, step, heads, STEPS: tl.constexpr):
    """Where (row, head, step)'s output starts, in HEAD_DIM units: the output is stored as
    [B, T, H, D] (`output_like`)."""
    return (row * STEPS + step) * heads + head


@triton.jit
def _merge_step(acc_ptr, max_ptr, sum_ptr, out_ptr, row, head, step, heads, splits, reached,
                STEPS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_TILE: tl.constexpr):
    """out[row, head, step] from the partial softmaxes of the `reached` splits (the others'
    programs returned early and wrote nothing), read from L2: other programs wrote them."""
    split = tl.arange(0, SPLITS_PAD)
    split_ok = split < reached
    dims = tl.arange(0, DIM_TILE)
    dim_ok = dims < HEAD_DIM
    partial = ((row * heads + head) * splits + split) * STEPS + step
    maxes = tl.load(max_ptr + partial, mask=split_ok, other=float("-inf"), cache_modifier=".cg")
    sums = tl.load(sum_ptr + partial, mask=split_ok, other=0.0, cache_modifier=".cg")
    acc = tl.load(acc_ptr + partial[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None] & dim_ok[None, :],
                  other=0.0, cache_modifier=".cg")
    weights = tl.exp(maxes - tl.max(maxes, axis=0))
    out = tl.sum(acc * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
    output_row = _output_rows(row, head, step, heads, STEPS)
    tl.store(out_ptr + output_row * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@functools.lru_cache(maxsize=None)
def _merge_tickets(device: torch.device, ring: int, pairs: int) -> torch.Tensor:
    """Per (row, head), how many of its splits have stored their partial softmax: int32, zero
    between calls (the program that merges sets it back). One set per key ring (`ring`: its
    storage's address), made at its first split call (the frame runner runs a frame before it
    captures one): a ring's calls run one after another in stream order, and each leaves the
    counts at zero. Rings of different streams never share a set, so the frame's parts may run
    side by side (the next frame's Mimi encode beside this frame's LM step)."""
    return torch.zeros(pairs, dtype=torch.int32, device=device)


def _product_type(q: torch.Tensor, keys: torch.Tensor) -> tl.dtype:
    """The type the tensor cores multiply in: the queries' type, with two exceptions.
    - float8 rings: float16, as float8 (e4m3) converts to it in one instruction per pair and
      exactly, and bf16 queries fit it (more mantissa, ample range for attention queries).
      Converting to bf16 took several instructions per pair and bound the kernel (run G).
    - the CPU: Triton's interpreter (3.9) multiplies bfloat16 operands' raw bits, so there
      the products run in float32 (same algorithm, exact operands)."""
    if q.device.type == "cpu" or q.dtype == torch.float32:
        return tl.float32
    if keys.dtype == torch.float8_e4m3fn:
        return tl.float16
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[q.dtype]


def output_like(q: torch.Tensor) -> torch.Tensor:
    """The op's output [B, H, T, D], stored as [B, T, H, D]: what the output projection reads
    (heads side by side per step), so that merging the heads is a view, not a copy."""
    batch, heads, steps, head_dim = q.shape
    return torch.empty(batch, steps, heads, head_dim, device=q.device, dtype=q.dtype).transpose(1, 2)


# A custom op, so that torch.compile treats the kernel as one opaque call with a known output
# shape when it compiles the whole frame (`FrameRunner`), instead of tracing its launch.
@torch.library.custom_op("personaplex::ring_attention", mutates_args=("keys", "values"))
def ring_attention(q: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, first_position: torch.Tensor,
                   cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """q, new_keys, new_values [B, H, T, D] of the steps at positions first_position[b] ..
    first_position[b] + T - 1 (int64 [B], >= 0: the callers pass their state's own position
    buffer, which the compiler hands over as it is, where a position computed in the frame would
    be copied for each layer); keys/values [B, H, slots, D] contiguous rings.
    With cos and sin ([B, T, D/2] float32, `layers.rope_angles` of those positions), q and the
    new keys are given before RoPE and rotated here, exactly as `layers.rope` rotates them.

    Stores the new keys/values at slot position % slots, then returns [B, H, T, D] in q's
    dtype: softmax(q k^T / sqrt(D)) v over the slots whose newest position is at most the
    query's (slot s holds position last - ((last - s) mod slots); negative: never written)."""
    return launch_ring_attention(q, new_keys, new_values, keys, values, first_position, DEFAULT_LAUNCH, cos, sin)


def launch_ring_attention(q: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor, keys: torch.Tensor,
                          values: torch.Tensor, first_position: torch.Tensor, launch: RingLaunch,
                          cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """`ring_attention` with a given launch shape (the op always takes the default)."""
    batch, heads, steps, head_dim = q.shape
    capacity = keys.shape[2]
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("ring_attention needs contiguous key and value rings")
    if (cos is None) != (sin is None) or (cos is not None and (cos.shape != sin.shape or
                                                                tuple(cos.shape) != (batch, steps, head_dim // 2))):
        raise ValueError(f"ring_attention's RoPE tables must both be [{batch}, {steps}, {head_dim // 2}]")
    q, new_keys, new_values = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, new_keys, new_values))
    rope = cos is not None
    if rope:
        cos, sin = cos.float().contiguous(), sin.float().contiguous()
    else:  # pointers the kernel never reads
        cos = sin = first_position
    split = launch.split or choose_split(batch, heads, capacity, q.device)
    splits = triton.cdiv(capacity, split)
    dim_tile = max(QUERY_TILE, triton.next_power_of_2(head_dim))
    out = output_like(q)
    partials = (batch, heads, splits, steps)
    acc = torch.empty(*partials, head_dim, device=q.device, dtype=torch.float32) if splits > 1 else out
    maxes = torch.empty(partials, device=q.device, dtype=torch.float32) if splits > 1 else out
    sums = torch.empty_like(maxes) if splits > 1 else out
    tickets = _merge_tickets(q.device, keys.untyped_storage().data_ptr(), batch * heads) if splits > 1 else first_position  # never read with one split
    first_position = first_position.contiguous()
    _ring_attention_split[(batch, heads, splits)](
        q, new_keys, new_values, keys, values, first_position, cos, sin, out, acc, maxes, sums, tickets,
        *q.stride()[:3], *new_keys.stride()[:3], *new_values.stride()[:3],
        cos.stride(0) if rope else 0, cos.stride(1) if rope else 0, heads, capacity, splits, head_dim**-0.5,
        STEPS=steps, QUERIES=QUERY_TILE, HEAD_DIM=head_dim, DIM_TILE=dim_tile, SPLIT=split,
        SPLITS_PAD=triton.next_power_of_2(splits),
        BLOCK=max(QUERY_TILE, min(launch.block, triton.next_power_of_2(capacity))), ONE_SPLIT=splits == 1,
        ROPE=rope, PRODUCT_TYPE=_product_type(q, keys),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out


@ring_attention.register_fake
def _ring_attention_shape(q: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
                          keys: torch.Tensor, values: torch.Tensor, first_position: torch.Tensor,
                          cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    return output_like(q)
