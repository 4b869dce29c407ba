"""One depformer step (all its layers, then the logits head) in one Triton launch.

Per frame the depformer runs 8 steps of 6 layers for B conversations. Every product in it is
small (1024 wide; B rows of 1 to 64), so the readable step is ~45 small kernels whose launch
and tail latencies add up to several times the 0.3 ms it takes to read the weights once
(1.3 GB at 4.3 TB/s): the GPU mostly waits between kernels.

The kernel runs a step as a sequence of PHASES, each a product whose output columns are
shared out among the programs (each program reads the weight rows of its columns once and
computes them for every row of x: up to 4 rows as multiply-and-sum on the CUDA cores, more
on the tensor cores), with the element-wise work fused into the phase that needs it:

  per layer  qkv:     RMSNorm(x) @ in_proj^T; q to a workspace, k and v into the step's
                     cache slot (the norm's statistic comes out of the same pass over x:
                     sum(x^2) is accumulated beside the product, which is scaled at the end)
             attend:  on the tensor cores only: each (row, head) over the cache slots
                     0..step, to a workspace
             out:     attention @ out_proj^T, plus the residual; on the CUDA cores each
                     program first recomputes the attention its columns need (every head of
                     every row, a few thousand multiply-adds), in place of a phase of its
                     own and the barrier after it (about as long, measured: see below)
             gate:    RMSNorm(x) @ linear_in^T; a program owns matching columns of both
                     halves, so silu(a) * b is done there
             ffn:     gate @ linear_out^T, plus the residual
  last       logits:  x @ head^T
  (a frame)  sample:  each row's token drawn from the step's logits (`sampling.py`'s draw of
                     one part, from registers), and the next step's input: its depformer_in
                     projection plus the embedding of the token it reads (given or drawn)

On the CUDA cores (up to 4 rows) each product's columns are cut into tiles just narrow
enough that no program gets more than one (`tile_constants`): a phase is latency-bound, so
its weights are best spread over every program, each asking for its share at once.

A phase reads what the previous one wrote in every program, so phases are separated by a
barrier across all programs. Two ways to run the same phase code:
- PERSISTENT (CUDA): one launch of a few programs per SM (`LaunchShape`), all resident at
  once, looping over the phases with a grid barrier between them: a shared int32 counter
  that each program increments (release) when done with a phase, then polls (acquire) until
  every program has arrived. On the CUDA cores a phase (all but the gate's) asks for its first
  weights before it waits (they do not depend on the previous phase), so that their trip from
  memory overlaps the barrier. Data
  another program wrote is read with ".cg" loads (from L2, never a stale L1). The counter is
  a zeroed workspace of the call, so a replayed CUDA graph zeroes it again.
- one launch per phase (Triton's interpreter, which runs programs one after another and
  would spin forever at a barrier; also a reference for the persistent mode on CUDA): the
  kernel boundaries are the barriers.

The same kernel runs one step (`fused_depformer_step`: the frame runner's loop samples between
launches) or all of a frame's steps (`fused_depformer_frame`: the steps' phases one after the
other, each step's draw its last phase), so that a frame's depformer is one launch, its
tokens drawn inside it with the noise keys the readable sampler would use. The tables of
addresses then hold every step's weights, heads and input embeddings.

The layers' weights are in the activations' dtype, or fp8 (e4m3 codes with one float32 scale
per output row, `--weights fp8`): a product then converts the codes as it loads them and
scales each output's sum over K once. The logits heads stay in the activations' dtype.

Numbers follow the readable `depformer_step`: float32 arithmetic, and every intermediate the
readable path materialises (q/k/v, attention, gate, residual stream) rounded to the
activation dtype where it does. Keys and values go to slot `step` of each layer's cache as
the readable path writes them, so both paths can share one `DepformerState`.

Measured on an H200 (bench/depformer_fused.py; bench/results/h200-depformer-fused.json), a
frame's 8 steps in one CUDA graph, random bf16 weights: at one row 1.18 ms against 1.50 for
the steps compiled whole by torch.compile (the frame runner's path) and 2.73 eager in one
process, 1.32 against 1.25 in another (the compiled steps vary between processes); in the
whole graphed frame, measured one after the other in one session, 7.80 ms against 8.35,
which is what decides. From two rows on the compiled steps win (two: 1.64 against 1.43 ms;
64 rows on the tensor cores: 3.0 against 1.6), so `Kernels.fast()` takes this kernel for
one-row frames only. With 5 phases a layer, a step took ~147 us where its weights alone
would read in ~40: ~4.7 us for each of its 31 phases, each a few dependent trips to memory and
a grid barrier. Run P (h200-depformer-fused.json) reworked it as above: the narrow tiles, the
weights asked for before each barrier and the register cap each measured worth 10-19 % of the
8 steps, and the frame's 8 steps went 1.30 -> 1.19-1.21 ms at one row, bf16 (fp8: 1.13 ->
1.15 ms, slots of 4). Merging the attention into the out phase saved less than its barrier:
timed per phase, the merged phase takes 8.0 us against 3.8 + 4.4 for the two it replaces,
since every program now reads the whole cache from L2. In the graphed frame: bf16 6.88 ->
6.83 ms, fp8 5.33 -> 5.38 ms (run P, each pair in one call). A frame's 8 steps in one launch
with their draws (run AA; against 8 launches and 8 sampling kernels, same machine): fp8 back to
back 4.01-4.03 -> 3.99-4.01 ms, bf16 5.47 -> 5.46 ms; the eight launch gaps it removes were
partly hidden by the graph already, and the draw's registers cost the kernel spills (176 bytes a
thread at the 128-register cap, against 96 without the draw).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from . import SAMPLING_PART_WIDTH, device_index, multiprocessors
from .sampling import KEY_BITS_OF_DTYPE, draw, kth_key, ordered_keys


# The parts of a layer, in order (see the module doc). The kernel reads module constants only
# as tl.constexpr. On the CUDA cores a layer has no ATTEND phase: its OUT phase recomputes the
# attention.
QKV, ATTEND, OUT, GATE = (tl.constexpr(part) for part in range(4))  # the 5th, FFN, is the else
# Pointers per layer in the weight table, in this order (`LMModel.depformer_step_weights`); the
# scale table of fp8 weights has the same layout (its norm entries are never read).
NORM1, IN_PROJ, OUT_PROJ, NORM2, LINEAR_IN, LINEAR_OUT = (tl.constexpr(which) for which in range(6))
WEIGHTS_PER_LAYER = tl.constexpr(6)
# tl.dot takes tiles of at least 16 along every side: on the tensor cores, the rows of x are
# padded to 16 and a program's output columns come at least 16 at a time.
DOT_MIN = 16
MAX_DOT_ROWS = 64  # rows per product tile; more rows loop over tiles of 64
MAX_DOT_TILE = 8192  # elements of x (rows x inputs) per iteration on the tensor cores
INTERPRETER_PROGRAMS = 3  # on the CPU: several programs, so the tests see columns shared out

_TRITON_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                 torch.float8_e4m3fn: tl.float8e4nv}


@dataclasses.dataclass(frozen=True)
class LaunchShape:
    """How the kernel shares a step out. A phase is latency-bound at these sizes (a few MB of
    weights over 132 SMs): what counts is how many weight bytes each SM has in flight, which
    grows with the weight tile a program loads per iteration and with the programs resident
    on an SM.

    block_n:         output columns per program tile (a power of two; >= 16 on the tensor
                     cores; on the CUDA cores the widest, see `tile_constants`)
    weight_tile:     weight elements a program loads per iteration (block_n x block_k; at most
                     block_n x a product's inputs)
    num_warps:       warps per program
    programs_per_sm: programs per SM, all resident at once (capped at what the compiled
                     kernel's registers and shared memory allow: a grid barrier with a program
                     left waiting for an SM would never open)
    attention_slots: cache slots whose keys and values the attention holds in registers at
                     once (a power of two): 8, a frame's 8 agent steps in one pass, measured
                     2 % faster a frame than 4 in two passes (H200, one row)
    """

    block_n: int
    weight_tile: int
    num_warps: int
    programs_per_sm: int
    attention_slots: int = 8

    @staticmethod
    def for_rows(rows: int) -> "LaunchShape":
        """The shape measured fastest for `rows` conversations (bench/depformer_fused.py)."""
        if on_cuda_cores(rows):
            return LaunchShape(block_n=16, weight_tile=16384, num_warps=8, programs_per_sm=2)
        return LaunchShape(block_n=32, weight_tile=8192, num_warps=4, programs_per_sm=1)


def on_cuda_cores(rows: int) -> bool:
    """Up to 4 rows, the products run as multiply-and-sum on the CUDA cores, row by row (a
    reduction across the program per row and iteration); more rows go to the tensor cores,
    padded to a 16-row tile."""
    return rows <= 4


def step_phases(rows: int, layers: int) -> int:
    """Phases of a step for `rows` rows: 4 a layer on the CUDA cores, 5 on the tensor cores
    (the attention a phase of its own), then the logits."""
    return layers * (4 if on_cuda_cores(rows) else 5) + 1


def tile_constants(rows: int, shape: LaunchShape, programs: int, dim: int, hidden: int, card: int) -> dict:
    """The kernel's tile constants for `rows` rows launched as `shape` on `programs` programs,
    for a depformer of width `dim`, feed-forward width `hidden` and `card` logits: the rows per
    tile, the phases per layer, and per product (QKV, OUT, GATE, FFN, HEAD) the output columns
    of a program's tile (_N) and the inputs it loads per iteration (_K)."""
    cuda_cores = on_cuda_cores(rows)
    if cuda_cores:
        block_rows = triton.next_power_of_2(rows)
    else:
        block_rows = min(MAX_DOT_ROWS, max(DOT_MIN, triton.next_power_of_2(rows)))
    constants = dict(BLOCK_B=block_rows, ON_TENSOR_CORES=not cuda_cores, PHASES_PER_LAYER=step_phases(rows, 1) - 1)
    products = dict(QKV=(3 * dim, dim), OUT=(dim, dim), GATE=(hidden, dim), FFN=(dim, hidden), HEAD=(card, dim))
    for name, (outputs, inputs) in products.items():
        if cuda_cores:
            # The narrowest tile that leaves no program more than one (up to shape.block_n
            # columns): every phase is a single dependent trip to memory, so its weight rows
            # are best spread over all the programs, each loading its share at once (a
            # 1024-output product in 4-column tiles: 256 programs, not 64 of 16 columns).
            block_n = min(shape.block_n, triton.next_power_of_2(triton.cdiv(outputs, programs)))
            block_k = shape.weight_tile // block_n
        else:
            block_n = max(DOT_MIN, shape.block_n)
            # The x tile, in registers, bounds the iteration there.
            block_k = max(DOT_MIN, min(shape.weight_tile, MAX_DOT_TILE) // block_rows)
        constants[f"{name}_N"], constants[f"{name}_K"] = block_n, min(block_k, triton.next_power_of_2(inputs))
    return constants


@triton.jit
def _weight_chunk(w_ptr, w_rows, w_ok, k0, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Inputs k0 .. k0 + BLOCK_K of the weight rows w_rows, as stored ([BLOCK_N, BLOCK_K];
    nothing is read past K or for rows not w_ok)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptr + w_rows[:, None] * K + ks[None, :], mask=w_ok[:, None] & (ks < K)[None, :], other=0.0)


@triton.jit
def _product(in_ptr, row0, rows, w_first, w_ptr, w_rows, w_ok, scale_ptr, alpha_ptr, K: tl.constexpr,
             NORM: tl.constexpr, SCALED: tl.constexpr, PRODUCT_TYPE: tl.constexpr, BLOCK_B: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ON_TENSOR_CORES: tl.constexpr):
    """in[row0 : row0 + BLOCK_B, :K] @ w[w_rows, :K]^T as [BLOCK_B, BLOCK_N] float32. On the CUDA
    cores, w_first is the weight rows' first chunk (`_weight_chunk` at 0), loaded by the caller
    before it waited at the grid barrier. On the tensor cores it goes unused (and so unloaded):
    there every chunk is loaded inside the loop, where Triton stages the chunks through shared
    memory ahead of the tensor cores; carried in from outside, the compiled kernel lost that
    staging and spilled (the 8 steps at 8 rows measured 2.2x slower, run P). With NORM, the
    input is RMSNorm(in) * alpha: the products take in * alpha, and the result is scaled by each
    row's 1 / rms, gathered in the same pass. With SCALED, w holds fp8 codes and row j of the
    weight is w[j] * scale[j]: the sums over K are scaled once at the end. `in` was written by
    other programs: read from L2."""
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
    squares = tl.zeros((BLOCK_B,), dtype=tl.float32)
    tile_rows = tl.arange(0, BLOCK_B)
    if ON_TENSOR_CORES:
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            w = _weight_chunk(w_ptr, w_rows, w_ok, k0, K, BLOCK_K)
            if NORM:
                alpha = tl.load(alpha_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            row_ids = row0 + tile_rows
            x = tl.load(in_ptr + row_ids[:, None] * K + ks[None, :], mask=(row_ids < rows)[:, None] & k_ok[None, :],
                        other=0.0, cache_modifier=".cg").to(tl.float32)
            if NORM:
                squares += tl.sum(x * x, axis=1)
                x = x * alpha[None, :]
            acc += tl.dot(x.to(PRODUCT_TYPE), tl.trans(w.to(PRODUCT_TYPE)), input_precision="tf32x3")
    else:
        w = w_first
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            if NORM:
                alpha = tl.load(alpha_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
            # Row by row: one weight tile in registers serves every row.
            weights = w.to(tl.float32)
            for r in tl.static_range(BLOCK_B):
                row_ok = (tl.zeros_like(ks) + row0 + r) < rows  # a tensor: row0 may be a Python int
                x = tl.load(in_ptr + (row0 + r) * K + ks, mask=k_ok & row_ok, other=0.0,
                            cache_modifier=".cg").to(tl.float32)
                if NORM:
                    squares += tl.where(tile_rows == r, tl.sum(x * x, axis=0), 0.0)
                    x = x * alpha
                acc += tl.where(tile_rows[:, None] == r, tl.sum(weights * x[None, :], axis=1)[None, :], 0.0)
            w = _weight_chunk(w_ptr, w_rows, w_ok, k0 + BLOCK_K, K, BLOCK_K)  # past K: nothing read
    if SCALED:
        acc *= tl.load(scale_ptr + w_rows, mask=w_ok, other=0.0)[None, :]
    return acc, squares


@triton.jit
def _inverse_rms(squares, K: tl.constexpr, eps):
    return 1.0 / tl.sqrt(squares / K + eps)


@triton.jit
def _rounded(x, ptr):
    """x as the tensor at `ptr` stores it, back in float32: the readable path's rounding."""
    return x.to(ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _tile_columns(tile, BLOCK_N: tl.constexpr):
    return tile * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _arrive(counter_ptr):
    """This program is done with a phase: once every thread's stores are issued, it counts
    itself in at the grid barrier (a release: what it stored is visible to whoever sees the
    count)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(counter_ptr, arrivals):
    """Wait at the grid barrier until `arrivals` programs in all have arrived (the counter only
    grows during a launch: barrier i waits for i * programs; 0 waits for nothing). A phase calls
    this after it has asked for its first weights, whose loads are thus in flight while it
    waits. Waiting programs poll with atomic adds of 0: polling with `ld.acquire` loads instead
    measured 45 % slower per step (H200, B = 1)."""
    if arrivals > 0:
        while tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu") < arrivals:
            pass
        tl.debug_barrier()


@triton.jit
def _qkv_phase(x_ptr, w_ptr, scale_ptr, alpha_ptr, q_ptr, keys_ptr, values_ptr, counter_ptr, arrivals, layer, rows,
               step, eps, program, programs, DIM: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
               SLOTS: tl.constexpr, SCALED: tl.constexpr, PRODUCT_TYPE: tl.constexpr, BLOCK_B: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ON_TENSOR_CORES: tl.constexpr):
    """RMSNorm(x) @ in_proj^T: q to its workspace [B, DIM], k and v into slot `step` of the
    layer's cache [layers, B, HEADS, SLOTS, HEAD_DIM]."""
    cols = _tile_columns(program, BLOCK_N)
    w = _weight_chunk(w_ptr, cols, cols < 3 * DIM, 0, DIM, BLOCK_K)
    _wait(counter_ptr, arrivals)
    for tile in range(program, tl.cdiv(3 * DIM, BLOCK_N), programs):
        cols = _tile_columns(tile, BLOCK_N)
        col_ok = cols < 3 * DIM
        part = cols // DIM  # 0: q, 1: k, 2: v
        within = cols % DIM
        head = within // HEAD_DIM
        dim = within % HEAD_DIM
        for row0 in range(0, rows, BLOCK_B):
            row_ids = row0 + tl.arange(0, BLOCK_B)
            row_ok = row_ids < rows
            acc, squares = _product(x_ptr, row0, rows, w, w_ptr, cols, col_ok, scale_ptr, alpha_ptr, DIM, True,
                                    SCALED, PRODUCT_TYPE, BLOCK_B, BLOCK_N, BLOCK_K, ON_TENSOR_CORES)
            qkv = acc * _inverse_rms(squares, DIM, eps)[:, None]
            ok = row_ok[:, None] & col_ok[None, :]
            tl.store(q_ptr + row_ids[:, None] * DIM + within[None, :], qkv.to(q_ptr.dtype.element_ty),
                     mask=ok & (part == 0)[None, :])
            # Rounded to the activation dtype first, as the readable path's projection is.
            qkv = _rounded(qkv, q_ptr)
            ring = (layer * rows + row_ids[:, None]) * HEADS + head[None, :]
            slot = (ring * SLOTS + step) * HEAD_DIM + dim[None, :]
            tl.store(keys_ptr + slot, qkv.to(keys_ptr.dtype.element_ty), mask=ok & (part == 1)[None, :])
            tl.store(values_ptr + slot, qkv.to(values_ptr.dtype.element_ty), mask=ok & (part == 2)[None, :])
        next_cols = _tile_columns(tile + programs, BLOCK_N)
        w = _weight_chunk(w_ptr, next_cols, next_cols < 3 * DIM, 0, DIM, BLOCK_K)


@triton.jit
def _heads_attention(q_ptr, keys_ptr, values_ptr, layer, rows, row, first_head, step, scale, DIM: tl.constexpr,
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr, HEADS_TILE: tl.constexpr,
                     DIM_TILE: tl.constexpr, SLOT_CHUNK: tl.constexpr):
    """softmax(q k^T * scale) v of heads first_head .. first_head + HEADS_TILE - 1 of one row
    over the cache slots 0..step, as [HEADS_TILE, DIM_TILE] float32 (zero past HEADS and
    HEAD_DIM). The softmax runs online over chunks of SLOT_CHUNK slots, so that only a chunk's
    keys and values are in registers."""
    heads = first_head + tl.arange(0, HEADS_TILE)
    dims = tl.arange(0, DIM_TILE)
    head_dim_ok = (heads < HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + row * DIM + heads[:, None] * HEAD_DIM + dims[None, :], mask=head_dim_ok, other=0.0,
                cache_modifier=".cg").to(tl.float32)
    rings = ((layer * rows + row) * HEADS + heads) * SLOTS  # each head's first slot
    best = tl.full((HEADS_TILE,), float("-inf"), tl.float32)
    total = tl.zeros((HEADS_TILE,), tl.float32)
    out = tl.zeros((HEADS_TILE, DIM_TILE), tl.float32)
    for first in range(0, step + 1, SLOT_CHUNK):
        slots = first + tl.arange(0, SLOT_CHUNK)
        seen = slots <= step
        offsets = (rings[:, None, None] + slots[None, :, None]) * HEAD_DIM + dims[None, None, :]
        ok = head_dim_ok[:, None, :] & seen[None, :, None]
        keys = tl.load(keys_ptr + offsets, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        values = tl.load(values_ptr + offsets, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        scores = tl.where(seen[None, :], tl.sum(q[:, None, :] * keys, axis=2) * scale, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        correction = tl.exp(best - new_best)  # 0 at the first chunk
        weights = tl.exp(scores - new_best[:, None])
        total = total * correction + tl.sum(weights, axis=1)
        out = out * correction[:, None] + tl.sum(weights[:, :, None] * values, axis=1)
        best = new_best
    return out / total[:, None]


@triton.jit
def _attend_phase(q_ptr, keys_ptr, values_ptr, attn_ptr, counter_ptr, arrivals, layer, rows, step, scale, program,
                  programs, DIM: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr,
                  DIM_TILE: tl.constexpr, SLOT_CHUNK: tl.constexpr):
    """On the tensor cores: the attention of each (row, head), shared out among the programs,
    to the workspace [B, DIM]."""
    dims = tl.arange(0, DIM_TILE)
    _wait(counter_ptr, arrivals)
    for item in range(program, rows * HEADS, programs):
        row = item // HEADS
        head = item % HEADS
        out = _heads_attention(q_ptr, keys_ptr, values_ptr, layer, rows, row, head, step, scale, DIM, HEADS, HEAD_DIM,
                               SLOTS, 1, DIM_TILE, SLOT_CHUNK)
        tl.store(attn_ptr + row * DIM + head * HEAD_DIM + dims[None, :], out.to(attn_ptr.dtype.element_ty),
                 mask=(dims < HEAD_DIM)[None, :])


@triton.jit
def _attention_weights(w_ptr, cols, inputs, inputs_ok, DIM: tl.constexpr):
    """out_proj's rows `cols` as [BLOCK_N, HEADS_TILE, DIM_TILE]: laid out as the attention is."""
    ok = (cols < DIM)[:, None, None] & inputs_ok[None, :, :]
    return tl.load(w_ptr + cols[:, None, None] * DIM + inputs[None, :, :], mask=ok, other=0.0)


@triton.jit
def _attention_out_phase(q_ptr, keys_ptr, values_ptr, w_ptr, scale_ptr, residual_ptr, out_ptr, counter_ptr, arrivals,
                         layer, rows, step, scale, program, programs, DIM: tl.constexpr, HEADS: tl.constexpr,
                         HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr, HEADS_TILE: tl.constexpr,
                         DIM_TILE: tl.constexpr, SLOT_CHUNK: tl.constexpr, SCALED: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """On the CUDA cores: out = residual + attention @ out_proj^T, where every program
    recomputes the attention of each row (every head, from q and the caches) that its columns
    need. The attention is a few thousand multiply-adds a row, but every program reads the
    whole cache from L2 for it: measured, this phase takes about as long as the attention's own
    phase, its barrier and the out phase did (run P). (out may be residual: a column is read and
    written only by its owner.)"""
    heads = tl.arange(0, HEADS_TILE)
    dims = tl.arange(0, DIM_TILE)
    inputs = heads[:, None] * HEAD_DIM + dims[None, :]
    inputs_ok = (heads < HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    w = _attention_weights(w_ptr, _tile_columns(program, BLOCK_N), inputs, inputs_ok, DIM)
    _wait(counter_ptr, arrivals)
    for tile in range(program, tl.cdiv(DIM, BLOCK_N), programs):
        cols = _tile_columns(tile, BLOCK_N)
        col_ok = cols < DIM
        weights = w.to(tl.float32)
        for row in range(0, rows):
            attention = _heads_attention(q_ptr, keys_ptr, values_ptr, layer, rows, row, 0, step, scale, DIM, HEADS,
                                         HEAD_DIM, SLOTS, HEADS_TILE, DIM_TILE, SLOT_CHUNK)
            # Rounded to the activation dtype, as the readable path's attention output is.
            out = tl.sum(tl.sum(weights * _rounded(attention, out_ptr)[None, :, :], axis=2), axis=1)
            if SCALED:
                out *= tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
            residual = tl.load(residual_ptr + row * DIM + cols, mask=col_ok, other=0.0,
                               cache_modifier=".cg").to(tl.float32)
            out = residual + _rounded(out, out_ptr)
            tl.store(out_ptr + row * DIM + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)
        w = _attention_weights(w_ptr, _tile_columns(tile + programs, BLOCK_N), inputs, inputs_ok, DIM)


@triton.jit
def _product_phase(in_ptr, w_ptr, scale_ptr, residual_ptr, out_ptr, counter_ptr, arrivals, rows, program, programs,
                   K: tl.constexpr, N: tl.constexpr, ADD_RESIDUAL: tl.constexpr, SCALED: tl.constexpr,
                   PRODUCT_TYPE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   ON_TENSOR_CORES: tl.constexpr):
    """out = in @ w^T, [B, N], or with ADD_RESIDUAL residual + in @ w^T (out may be residual:
    a column is read and written only by its owner)."""
    cols = _tile_columns(program, BLOCK_N)
    w = _weight_chunk(w_ptr, cols, cols < N, 0, K, BLOCK_K)
    _wait(counter_ptr, arrivals)
    for tile in range(program, tl.cdiv(N, BLOCK_N), programs):
        cols = _tile_columns(tile, BLOCK_N)
        col_ok = cols < N
        for row0 in range(0, rows, BLOCK_B):
            row_ids = row0 + tl.arange(0, BLOCK_B)
            row_ok = row_ids < rows
            out, _ = _product(in_ptr, row0, rows, w, w_ptr, cols, col_ok, scale_ptr, w_ptr, K, False, SCALED,
                              PRODUCT_TYPE, BLOCK_B, BLOCK_N, BLOCK_K, ON_TENSOR_CORES)
            offsets = row_ids[:, None] * N + cols[None, :]
            ok = row_ok[:, None] & col_ok[None, :]
            if ADD_RESIDUAL:
                residual = tl.load(residual_ptr + offsets, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
                out = residual + _rounded(out, out_ptr)
            tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)
        next_cols = _tile_columns(tile + programs, BLOCK_N)
        w = _weight_chunk(w_ptr, next_cols, next_cols < N, 0, K, BLOCK_K)


@triton.jit
def _gate_phase(x_ptr, w_ptr, scale_ptr, alpha_ptr, gate_ptr, counter_ptr, arrivals, rows, eps, program, programs,
                DIM: tl.constexpr, HIDDEN: tl.constexpr, SCALED: tl.constexpr, PRODUCT_TYPE: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ON_TENSOR_CORES: tl.constexpr):
    """silu(a) * b of the two halves of RMSNorm(x) @ linear_in^T (a: its first HIDDEN
    outputs), [B, HIDDEN]: a program computes column j of both halves. Unlike the other
    phases, this one asks for no weights before its grid barrier: both halves' tiles held
    there spill under the register cap (the 8 steps measured 1.9x slower, run P). It reads the
    most weights, so it is the phase least bound by its first trip to memory."""
    _wait(counter_ptr, arrivals)
    for tile in range(program, tl.cdiv(HIDDEN, BLOCK_N), programs):
        cols = _tile_columns(tile, BLOCK_N)
        col_ok = cols < HIDDEN
        for row0 in range(0, rows, BLOCK_B):
            row_ids = row0 + tl.arange(0, BLOCK_B)
            row_ok = row_ids < rows
            a_w = _weight_chunk(w_ptr, cols, col_ok, 0, DIM, BLOCK_K)
            a, squares = _product(x_ptr, row0, rows, a_w, w_ptr, cols, col_ok, scale_ptr, alpha_ptr, DIM, True,
                                  SCALED, PRODUCT_TYPE, BLOCK_B, BLOCK_N, BLOCK_K, ON_TENSOR_CORES)
            b_w = _weight_chunk(w_ptr, HIDDEN + cols, col_ok, 0, DIM, BLOCK_K)
            b, _ = _product(x_ptr, row0, rows, b_w, w_ptr, HIDDEN + cols, col_ok, scale_ptr, alpha_ptr, DIM, True,
                            SCALED, PRODUCT_TYPE, BLOCK_B, BLOCK_N, BLOCK_K, ON_TENSOR_CORES)
            inverse_rms = _inverse_rms(squares, DIM, eps)[:, None]
            a = _rounded(a * inverse_rms, gate_ptr)
            b = _rounded(b * inverse_rms, gate_ptr)
            gate = _rounded(a / (1.0 + tl.exp(-a)), gate_ptr) * b
            tl.store(gate_ptr + row_ids[:, None] * HIDDEN + cols[None, :], gate.to(gate_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _stamp_phase_end(phase_ends_ptr, phase):
    """For the benchmark's phase timer: the GPU's clock (ns) when this program finished `phase`,
    kept as the earliest and the latest over the programs (entries 2 phase and 2 phase + 1)."""
    tl.debug_barrier()
    now = tl.extra.cuda.globaltimer().to(tl.int64)
    tl.atomic_min(phase_ends_ptr + 2 * phase, now)
    tl.atomic_max(phase_ends_ptr + 2 * phase + 1, now)


@triton.jit
def _layer_weight(table_ptr, layer, which: tl.constexpr, TYPE: tl.constexpr):
    """A weight's address from the table. Triton knows nothing of a loaded address's alignment:
    the hint (checked by the host) lets it load 16 bytes at a time."""
    return tl.multiple_of(tl.load(table_ptr + layer * WEIGHTS_PER_LAYER + which).to(tl.pointer_type(TYPE)), 16)


@triton.jit
def _layer_scale(scales_table_ptr, layer, which: tl.constexpr, SCALED: tl.constexpr):
    """The float32 row scales of an fp8 weight from the scale table (without SCALED, the table
    holds no scales: the address of the table itself, never read)."""
    if SCALED:
        return tl.load(scales_table_ptr + layer * WEIGHTS_PER_LAYER + which).to(tl.pointer_type(tl.float32))
    return scales_table_ptr.to(tl.pointer_type(tl.float32))


@triton.jit
def _sample_phase(logits_ptr, projections_ptr, projections_row_stride, embedding_ptr, next_x_ptr, tokens_ptr,
                  targets_ptr, targets_row_stride, provided_ptr, provided_row_stride, temperature_ptr, top_k_ptr,
                  noise_ptr, counter_ptr, arrivals, rows, local_step, steps, program, programs, DIM: tl.constexpr,
                  CARD: tl.constexpr, KEY_BITS: tl.constexpr, CARD_TILE: tl.constexpr, WIDTH_TILE: tl.constexpr):
    """A frame's step ends here: each row's token drawn from the step's logits, as the sampling
    kernel draws it (one part: from registers; `sampling.py`), stored at tokens[row, local_step];
    then the next step's input, depformer_in's projection plus the embedding of the token
    that step reads (the one given at targets where provided, else the one drawn; -1 embeds to
    zero), added and rounded as `LMModel.depformer_input` does. A program a row."""
    _wait(counter_ptr, arrivals)
    columns = tl.arange(0, CARD_TILE)
    dims = tl.arange(0, WIDTH_TILE)
    for row in range(program, rows, programs):
        k = tl.minimum(tl.maximum(tl.load(top_k_ptr + row), 1), CARD).to(tl.int32)
        temperature = tl.load(temperature_ptr + row)
        divisor = tl.where(temperature > 0, temperature, 1.0)
        noise_key = tl.load(noise_ptr + row * steps + local_step)
        keys = ordered_keys(logits_ptr, row, CARD, columns, CARD, KEY_BITS, True)
        kth = kth_key(keys, k, KEY_BITS)
        _, sampled, _, greedy = draw(keys, columns < CARD, kth, divisor, noise_key, columns,
                                      logits_ptr.dtype.element_ty, KEY_BITS)
        token = tl.where(temperature > 0, sampled, greedy).to(tl.int64)
        tl.store(tokens_ptr + row * steps + local_step, token)
        if local_step + 1 < steps:
            given = tl.load(provided_ptr + row * provided_row_stride + local_step) != 0
            token = tl.where(given, tl.load(targets_ptr + row * targets_row_stride + local_step), token)
            dim_ok = dims < DIM
            projected = tl.load(projections_ptr + row * projections_row_stride + (local_step + 1) * DIM + dims,
                                mask=dim_ok, other=0.0).to(tl.float32)
            embedded = tl.load(embedding_ptr + tl.maximum(token, 0) * DIM + dims, mask=dim_ok, other=0.0)
            embedded = tl.where(token != -1, embedded.to(tl.float32), 0.0)
            tl.store(next_x_ptr + row * DIM + dims, (projected + embedded).to(next_x_ptr.dtype.element_ty),
                     mask=dim_ok)


@triton.jit
def _step_pointer(table_ptr, local_step, TYPE: tl.constexpr):
    """A step's head or input embedding from its table (one address a step), 16-byte aligned."""
    return tl.multiple_of(tl.load(table_ptr + local_step).to(tl.pointer_type(TYPE)), 16)


# Triton compiles a variant per integer argument equal to 1 or divisible by 16: without this,
# the row counts, steps and phase bounds would compile a dozen variants of this large kernel.
@triton.jit(do_not_specialize=["rows", "first_step", "steps", "first_phase", "end_phase"])
def _depformer_steps(
    x_ptr, next_x_ptr, table_ptr, scales_table_ptr, heads_table_ptr, embeddings_table_ptr, keys_ptr, values_ptr,
    residual_ptr, q_ptr, attn_ptr, gate_ptr, logits_ptr, counter_ptr, phase_ends_ptr,
    projections_ptr, projections_row_stride, tokens_ptr, targets_ptr, targets_row_stride, provided_ptr,
    provided_row_stride, temperature_ptr, top_k_ptr, noise_ptr,
    rows, first_step, steps, first_phase, end_phase, eps, scale,
    LAYERS: tl.constexpr, DIM: tl.constexpr, HIDDEN: tl.constexpr, CARD: tl.constexpr, HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, SLOTS: tl.constexpr, HEADS_TILE: tl.constexpr, DIM_TILE: tl.constexpr,
    SLOT_CHUNK: tl.constexpr, WEIGHT_TYPE: tl.constexpr, ALPHA_TYPE: tl.constexpr, SCALED: tl.constexpr,
    PRODUCT_TYPE: tl.constexpr, PHASES_PER_LAYER: tl.constexpr, BLOCK_B: tl.constexpr,
    QKV_N: tl.constexpr, QKV_K: tl.constexpr, OUT_N: tl.constexpr, OUT_K: tl.constexpr, GATE_N: tl.constexpr,
    GATE_K: tl.constexpr, FFN_N: tl.constexpr, FFN_K: tl.constexpr, HEAD_N: tl.constexpr, HEAD_K: tl.constexpr,
    ON_TENSOR_CORES: tl.constexpr, PERSISTENT: tl.constexpr, TIMED: tl.constexpr, SAMPLE: tl.constexpr,
    KEY_BITS: tl.constexpr, CARD_TILE: tl.constexpr, WIDTH_TILE: tl.constexpr,
):
    """Phases first_phase .. end_phase - 1 of `steps` depformer steps, the first of them step
    `first_step` (its cache slot); with PERSISTENT, a grid barrier between each phase and the
    next. A step's phases: its layers' (see the module doc), the logits head (to logits
    [steps, B, CARD]), and with SAMPLE the draw of its tokens and the next step's input
    (`_sample_phase`). Step 0 reads its input at x, later steps theirs at next_x. The tables
    hold a step's addresses in turn: its layers' weights (table, [steps, LAYERS, 6]), their
    row scales with SCALED (scales_table, same layout: the weights are fp8 codes then; the
    head is not), its head and the embedding of its input token. With TIMED, each phase's end
    is stamped at phase_ends (`_stamp_phase_end`)."""
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    PHASES_PER_STEP: tl.constexpr = LAYERS * PHASES_PER_LAYER + 1 + SAMPLE
    for phase in range(first_phase, end_phase):
        local_step = phase // PHASES_PER_STEP
        step_phase = phase - local_step * PHASES_PER_STEP
        layer = step_phase // PHASES_PER_LAYER
        part = step_phase - layer * PHASES_PER_LAYER  # not %: the interpreter's constexpr has no __rmod__
        if PHASES_PER_LAYER < 5:  # no ATTEND phase: the parts after it come one earlier
            part = tl.where(part >= ATTEND, part + 1, part)
        layer_entry = local_step * LAYERS + layer  # the layer's row in the weight tables
        step_logits_ptr = logits_ptr + local_step * rows * CARD
        # The residual stream is the step's input until layer 0's attention has been added to it.
        stream_ptr = residual_ptr
        if layer == 0:
            if part <= OUT:
                stream_ptr = x_ptr
                if local_step > 0:
                    stream_ptr = next_x_ptr
        arrivals = 0  # the grid barrier before this phase: how many arrivals it waits for
        if PERSISTENT:
            arrivals = (phase - first_phase) * programs
        if layer == LAYERS:
            if part == 0:
                head_ptr = _step_pointer(heads_table_ptr, local_step, x_ptr.dtype.element_ty)
                _product_phase(residual_ptr, head_ptr, head_ptr, step_logits_ptr, step_logits_ptr, counter_ptr,
                               arrivals, rows, program, programs, DIM, CARD, False, False, PRODUCT_TYPE, BLOCK_B,
                               HEAD_N, HEAD_K, ON_TENSOR_CORES)
            elif SAMPLE:
                embedding_ptr = _step_pointer(embeddings_table_ptr, tl.minimum(local_step + 1, steps - 1),
                                              x_ptr.dtype.element_ty)
                _sample_phase(step_logits_ptr, projections_ptr, projections_row_stride, embedding_ptr, next_x_ptr,
                              tokens_ptr, targets_ptr, targets_row_stride, provided_ptr, provided_row_stride,
                              temperature_ptr, top_k_ptr, noise_ptr, counter_ptr, arrivals, rows, local_step, steps,
                              program, programs, DIM, CARD, KEY_BITS, CARD_TILE, WIDTH_TILE)
        elif part == QKV:
            _qkv_phase(stream_ptr, _layer_weight(table_ptr, layer_entry, IN_PROJ, WEIGHT_TYPE),
                       _layer_scale(scales_table_ptr, layer_entry, IN_PROJ, SCALED),
                       _layer_weight(table_ptr, layer_entry, NORM1, ALPHA_TYPE), q_ptr, keys_ptr, values_ptr,
                       counter_ptr, arrivals, layer, rows, first_step + local_step, eps, program, programs, DIM, HEADS,
                       HEAD_DIM, SLOTS, SCALED, PRODUCT_TYPE, BLOCK_B, QKV_N, QKV_K, ON_TENSOR_CORES)
        elif part == ATTEND:
            if ON_TENSOR_CORES:
                _attend_phase(q_ptr, keys_ptr, values_ptr, attn_ptr, counter_ptr, arrivals, layer, rows,
                              first_step + local_step, scale, program, programs, DIM, HEADS, HEAD_DIM, SLOTS,
                              DIM_TILE, SLOT_CHUNK)
        elif part == OUT:
            out_proj = _layer_weight(table_ptr, layer_entry, OUT_PROJ, WEIGHT_TYPE)
            out_scales = _layer_scale(scales_table_ptr, layer_entry, OUT_PROJ, SCALED)
            if ON_TENSOR_CORES:
                _product_phase(attn_ptr, out_proj, out_scales, stream_ptr, residual_ptr, counter_ptr, arrivals, rows,
                               program, programs, DIM, DIM, True, SCALED, PRODUCT_TYPE, BLOCK_B, OUT_N, OUT_K,
                               ON_TENSOR_CORES)
            else:
                _attention_out_phase(q_ptr, keys_ptr, values_ptr, out_proj, out_scales, stream_ptr, residual_ptr,
                                     counter_ptr, arrivals, layer, rows, first_step + local_step, scale, program,
                                     programs, DIM, HEADS, HEAD_DIM, SLOTS, HEADS_TILE, DIM_TILE, SLOT_CHUNK, SCALED,
                                     OUT_N)
        elif part == GATE:
            _gate_phase(residual_ptr, _layer_weight(table_ptr, layer_entry, LINEAR_IN, WEIGHT_TYPE),
                        _layer_scale(scales_table_ptr, layer_entry, LINEAR_IN, SCALED),
                        _layer_weight(table_ptr, layer_entry, NORM2, ALPHA_TYPE), gate_ptr, counter_ptr, arrivals,
                        rows, eps, program, programs, DIM, HIDDEN, SCALED, PRODUCT_TYPE, BLOCK_B, GATE_N, GATE_K,
                        ON_TENSOR_CORES)
        else:
            _product_phase(gate_ptr, _layer_weight(table_ptr, layer_entry, LINEAR_OUT, WEIGHT_TYPE),
                           _layer_scale(scales_table_ptr, layer_entry, LINEAR_OUT, SCALED), residual_ptr,
                           residual_ptr, counter_ptr, arrivals, rows, program, programs, HIDDEN, DIM, True, SCALED,
                           PRODUCT_TYPE, BLOCK_B, FFN_N, FFN_K, ON_TENSOR_CORES)
        if TIMED:
            _stamp_phase_end(phase_ends_ptr, phase)
        if PERSISTENT:
            if phase + 1 < end_phase:
                _arrive(counter_ptr)


@functools.lru_cache(maxsize=128)
def _pointer_table(pointers: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Addresses as the kernel reads them (int64: the weights', their scales', the heads' or the
    embeddings'), made once per set of tensors: it is a host-to-device copy, which a CUDA graph
    being captured cannot hold (the frame runner runs a frame before it captures one)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("fused_depformer_step: run the step once before capturing it in a CUDA graph")
    return torch.tensor(pointers, dtype=torch.int64).to(device)


def _uniform_type(tensors: list[torch.Tensor], what: str) -> torch.dtype:
    types = {t.dtype for t in tensors}
    if len(types) != 1:
        raise ValueError(f"fused_depformer_step: the {what} must share one dtype, got {sorted(map(str, types))}")
    return types.pop()


@functools.cache
def _resident_programs_per_sm(index: int, registers_per_thread: int, shared_bytes: int, num_warps: int) -> int:
    """How many programs of a compiled kernel fit on one SM at once (CUDA's occupancy rule:
    registers are given per warp in units of 256, shared memory per block, threads per SM)."""
    properties = torch.cuda.get_device_properties(index)
    registers_per_warp = math.ceil(registers_per_thread * 32 / 256) * 256
    by_registers = getattr(properties, "regs_per_multiprocessor", 65536) // (registers_per_warp * num_warps)
    by_threads = getattr(properties, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    shared_per_sm = getattr(properties, "shared_memory_per_multiprocessor", 233472)
    by_shared = shared_per_sm // (shared_bytes + 1024) if shared_bytes else by_threads  # 1 KB per block is the driver's
    return max(1, min(by_registers, by_threads, by_shared))


def register_cap(register_file: int, shape: LaunchShape) -> int:
    """The most registers a thread may take for shape.programs_per_sm programs to fit on an SM
    of `register_file` registers together (given in multiples of 8, at most 255). Left to
    itself, the compiler keeps the phases' first weights in registers across the grid barrier
    and takes ~230-250 a thread at one row, which fits one program of 8 warps an SM, not two;
    capped at 128 it spills ~150 bytes a thread instead (sm_90, bench/offline_compile.py)."""
    return min(255, register_file // (shape.num_warps * 32 * shape.programs_per_sm) // 8 * 8)


@functools.cache
def _register_cap(index: int, shape: LaunchShape) -> int:
    """`register_cap` on device `index`."""
    properties = torch.cuda.get_device_properties(index)
    return register_cap(getattr(properties, "regs_per_multiprocessor", 65536), shape)


def _programs(kernel: triton.JITFunction, arguments: tuple, constants: dict, options: dict, shape: LaunchShape,
              index: int) -> int:
    """One program per SM of device `index` times shape.programs_per_sm, at most what stays resident."""
    compiled = kernel.warmup(*arguments, grid=(1,), **options, **constants)
    compiled._init_handles()  # loads the binary: its register count is known from here
    resident = _resident_programs_per_sm(index, compiled.n_regs, compiled.metadata.shared, shape.num_warps)
    return multiprocessors(index) * min(shape.programs_per_sm, resident)


@dataclasses.dataclass(frozen=True)
class FrameSampling:
    """What a frame's steps need to draw their tokens in the kernel (`launch_fused_depformer_frame`):
    projections [B, >= steps, dim] (each step's depformer_in of the hidden state), temperature [B]
    float32 and top_k [B] (the rows' audio settings), noise_keys [B, steps] int64 (a key per
    row and step, `RowNoise.next_keys`), and the tokens given to the steps: targets [B, >= steps]
    int64, used as step s + 1's input where provided [B, >= steps] (bool) is set."""

    projections: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    noise_keys: torch.Tensor
    targets: torch.Tensor
    provided: torch.Tensor

    def check(self, rows: int, steps: int, dim: int, card: int) -> None:
        if card > SAMPLING_PART_WIDTH:
            raise ValueError(f"fused_depformer_frame: the kernel draws from at most {SAMPLING_PART_WIDTH} logits a row, "
                             f"not {card}")
        projections = self.projections
        if projections.dim() != 3 or projections.shape[0] != rows or projections.shape[1] < steps \
                or projections.shape[2] != dim or projections.stride()[1:] != (dim, 1):
            raise ValueError(f"fused_depformer_frame: projections {tuple(projections.shape)} for {rows} rows of "
                             f"{steps} steps of {dim}, each row's steps contiguous")
        if self.temperature.shape != (rows,) or self.temperature.dtype != torch.float32 or self.top_k.shape != (rows,):
            raise ValueError("fused_depformer_frame: one float32 temperature and one top-k a row")
        if self.noise_keys.shape != (rows, steps) or self.noise_keys.dtype != torch.int64 \
                or not self.noise_keys.is_contiguous():
            raise ValueError(f"fused_depformer_frame: noise keys [{rows}, {steps}] int64, contiguous")
        for given, dtype in ((self.targets, torch.int64), (self.provided, torch.bool)):
            if given.dim() != 2 or given.shape[0] != rows or given.shape[1] < steps or given.dtype != dtype \
                    or given.stride(1) != 1:
                raise ValueError(f"fused_depformer_frame: targets (int64) and provided (bool) are [{rows}, >= {steps}] "
                                 f"with each row's steps contiguous")


# A custom op, so that torch.compile keeps the launch opaque when it compiles the whole frame.
@torch.library.custom_op("personaplex::fused_depformer_step", mutates_args=("keys", "values"))
def fused_depformer_step(x: torch.Tensor, layer_weights: list[torch.Tensor], head: torch.Tensor, keys: torch.Tensor,
                         values: torch.Tensor, step: int, eps: float, layer_scales: list[torch.Tensor]) -> torch.Tensor:
    """Every depformer layer of step `step`, then the logits head: x [B, dim] (depformer_in of
    the hidden state plus the token's embedding) -> logits [B, card] in x's dtype.

    layer_weights: per layer, in order, norm1's alpha, in_proj [3 dim, dim], out_proj
    [dim, dim], norm2's alpha, linear_in [2 hidden, dim], linear_out [dim, hidden] (the step's
    weights, contiguous; the four matrices in x's dtype, or all fp8 e4m3 codes); head
    [card, dim] in x's dtype; keys/values the depformer cache [layers, B, heads, steps,
    head_dim], contiguous: slot `step` of each layer is written. layer_scales: empty, or with
    fp8 matrices their float32 row scales, per layer in_proj, out_proj, linear_in, linear_out."""
    return launch_fused_depformer_step(x, layer_weights, head, keys, values, step, eps, persistent=x.is_cuda,
                                       layer_scales=layer_scales)


@torch.library.custom_op("personaplex::fused_depformer_frame", mutates_args=("keys", "values"))
def fused_depformer_frame(x: torch.Tensor, projections: torch.Tensor, layer_weights: list[torch.Tensor],
                          heads: list[torch.Tensor], embeddings: list[torch.Tensor], keys: torch.Tensor,
                          values: torch.Tensor, eps: float, layer_scales: list[torch.Tensor], temperature: torch.Tensor,
                          top_k: torch.Tensor, noise_keys: torch.Tensor, targets: torch.Tensor,
                          provided: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame's depformer steps 0 .. len(heads) - 1 in one launch, each step's tokens drawn in
    it: (tokens [B, steps] int64, logits [steps, B, card]). x is step 0's input; the steps'
    layer_weights (and layer_scales) one after the other, each as `fused_depformer_step`'s;
    heads and embeddings (the table of the token each step reads; step 0's is not read) a step
    each; the rest as `FrameSampling` holds them."""
    sampling = FrameSampling(projections, temperature, top_k, noise_keys, targets, provided)
    return launch_fused_depformer_frame(x, layer_weights, heads, embeddings, keys, values, eps, sampling,
                                        persistent=x.is_cuda, layer_scales=layer_scales)


def launch_fused_depformer_step(x: torch.Tensor, layer_weights: list[torch.Tensor], head: torch.Tensor,
                                keys: torch.Tensor, values: torch.Tensor, step: int, eps: float,
                                persistent: bool, shape: LaunchShape | None = None,
                                layer_scales: list[torch.Tensor] | None = None,
                                phase_ends: torch.Tensor | None = None) -> torch.Tensor:
    """`fused_depformer_step` in either mode (the op takes the persistent one on CUDA; the
    GPU test compares the two), shared out as `shape` says (default: `LaunchShape.for_rows`;
    the benchmark sweeps others). With `phase_ends` (int64, two entries a phase, CUDA only),
    the kernel writes, per phase, the earliest and the latest time (ns, the GPU's global timer)
    at which a program finished it: `bench/depformer_fused.py --phases` times each phase so."""
    # A step launched alone gets its input built on the host: its embedding table (here the
    # head's address, to fill the slot) is never read.
    logits, _ = _launch_steps(x, layer_weights, [head], [head], keys, values, step, eps, persistent, shape,
                              layer_scales, phase_ends, sampling=None)
    return logits[0]


def launch_fused_depformer_frame(x: torch.Tensor, layer_weights: list[torch.Tensor], heads: list[torch.Tensor],
                                 embeddings: list[torch.Tensor], keys: torch.Tensor, values: torch.Tensor, eps: float,
                                 sampling: FrameSampling, persistent: bool, shape: LaunchShape | None = None,
                                 layer_scales: list[torch.Tensor] | None = None,
                                 phase_ends: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_depformer_frame` in either mode, as `launch_fused_depformer_step` runs a step."""
    logits, tokens = _launch_steps(x, layer_weights, heads, embeddings, keys, values, 0, eps, persistent, shape,
                                   layer_scales, phase_ends, sampling)
    return tokens, logits


def step_count_phases(rows: int, layers: int, steps: int, sampled: bool) -> int:
    """Phases of `steps` steps in one launch: each step's, and with `sampled` its draw."""
    return steps * (step_phases(rows, layers) + int(sampled))


def _launch_steps(x: torch.Tensor, layer_weights: list[torch.Tensor], heads: list[torch.Tensor],
                  embeddings: list[torch.Tensor], keys: torch.Tensor, values: torch.Tensor, first_step: int, eps: float,
                  persistent: bool, shape: LaunchShape | None, layer_scales: list[torch.Tensor] | None,
                  phase_ends: torch.Tensor | None,
                  sampling: FrameSampling | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """len(heads) steps from `first_step` in one launch (persistent) or a launch a phase: the
    steps' logits [steps, B, card], and with `sampling` their tokens [B, steps]."""
    if persistent and not x.is_cuda:
        raise ValueError("the persistent depformer kernel needs CUDA: its grid barrier deadlocks in the interpreter")
    if phase_ends is not None and not (x.is_cuda and phase_ends.dtype == torch.int64):
        raise ValueError("fused_depformer_step: phase_ends is an int64 tensor on CUDA (the GPU's timer stamps it)")
    layers, rows, heads_count, slots, head_dim = keys.shape
    steps = len(heads)
    shape = shape or LaunchShape.for_rows(rows)
    dim = x.shape[1]
    hidden = layer_weights[LINEAR_OUT.value].shape[1]
    card = heads[0].shape[0]
    is_norm = [i % WEIGHTS_PER_LAYER.value in (NORM1.value, NORM2.value) for i in range(len(layer_weights))]
    layer_matrices = [w for w, norm in zip(layer_weights, is_norm) if not norm]
    alphas = [w for w, norm in zip(layer_weights, is_norm) if norm]
    if not all(t.is_contiguous() for t in [keys, values, *heads, *embeddings, *layer_matrices, *alphas]):
        raise ValueError("fused_depformer_step needs contiguous weights and caches")
    if any(w.data_ptr() % 16 for w in [*layer_weights, *heads, *embeddings]):
        raise ValueError("fused_depformer_step needs weights aligned to 16 bytes")
    if len(layer_weights) != steps * layers * WEIGHTS_PER_LAYER.value or heads_count * head_dim != dim:
        raise ValueError(f"fused_depformer_step: {len(layer_weights)} weights for {steps} steps of {layers} layers, "
                         f"{heads_count} heads of {head_dim} for width {dim}")
    if len(embeddings) != steps or first_step + steps > slots:
        raise ValueError(f"fused_depformer_step: steps {first_step} .. {first_step + steps - 1} with "
                         f"{len(embeddings)} embeddings, for a cache of {slots} steps")
    weight_type = _uniform_type(layer_matrices, "layers' weight matrices")
    alpha_type = _uniform_type(alphas, "norm scales")
    scaled = weight_type == torch.float8_e4m3fn
    _check_scales(layer_scales or [], layer_matrices, scaled)
    if any(t.dtype != x.dtype for t in [*heads, *embeddings]) or not (scaled or weight_type == x.dtype):
        raise ValueError(f"fused_depformer_step: weights in {weight_type} (heads {heads[0].dtype}) for activations in "
                         f"{x.dtype}: the matrices must be in the activations' dtype or fp8, the heads and "
                         f"embeddings in theirs")
    if sampling is not None:
        sampling.check(rows, steps, dim, card)
    x = x.contiguous()
    table = _pointer_table(tuple(w.data_ptr() for w in layer_weights), x.device)
    # The scale table takes the weight table's layout; without scales it is the weight table, never read.
    scales_table = _pointer_table(_scale_pointers(layer_scales), x.device) if scaled else table
    heads_table = _pointer_table(tuple(head.data_ptr() for head in heads), x.device)
    embeddings_table = _pointer_table(tuple(embedding.data_ptr() for embedding in embeddings), x.device)
    # Workspaces in the activation dtype: storing there is the readable path's rounding.
    residual, q, attn, next_x = (torch.empty(rows, dim, device=x.device, dtype=x.dtype) for _ in range(4))
    gate = torch.empty(rows, hidden, device=x.device, dtype=x.dtype)
    logits = torch.empty(steps, rows, card, device=x.device, dtype=x.dtype)
    counter = torch.zeros(1, device=x.device, dtype=torch.int32)  # zeroed again by every graph replay
    # The interpreter (3.9) multiplies bf16 tl.dot operands wrongly: float32 products there.
    product_type = tl.float32 if x.device.type == "cpu" or x.dtype == torch.float32 else _TRITON_TYPES[x.dtype]
    # The tiles are sized for the programs the shape asks for; should fewer fit on an SM (see
    # `_programs`), some programs loop over a second tile.
    index = device_index(x.device) if x.is_cuda else None
    intended_programs = multiprocessors(index) * shape.programs_per_sm if x.is_cuda else INTERPRETER_PROGRAMS
    tiles = tile_constants(rows, shape, intended_programs, dim, hidden, card)
    constants = dict(
        LAYERS=layers, DIM=dim, HIDDEN=hidden, CARD=card, HEADS=heads_count, HEAD_DIM=head_dim, SLOTS=slots,
        HEADS_TILE=triton.next_power_of_2(heads_count), DIM_TILE=triton.next_power_of_2(head_dim),
        SLOT_CHUNK=min(shape.attention_slots, triton.next_power_of_2(slots)), WEIGHT_TYPE=_TRITON_TYPES[weight_type],
        ALPHA_TYPE=_TRITON_TYPES[alpha_type], SCALED=scaled, PRODUCT_TYPE=product_type, PERSISTENT=persistent,
        TIMED=phase_ends is not None, SAMPLE=sampling is not None, KEY_BITS=KEY_BITS_OF_DTYPE[x.dtype],
        CARD_TILE=triton.next_power_of_2(card), WIDTH_TILE=triton.next_power_of_2(dim), **tiles,
    )
    phases = step_count_phases(rows, layers, steps, sampling is not None)
    if phase_ends is not None:
        if phase_ends.numel() != 2 * phases:
            raise ValueError(f"fused_depformer_step: phase_ends holds {phase_ends.numel()} entries for {phases} phases "
                             f"(two a phase)")
        phase_ends[0::2] = torch.iinfo(torch.int64).max  # the earliest end: an atomic min
        phase_ends[1::2] = 0
    tokens = None if sampling is None else torch.empty(rows, steps, device=x.device, dtype=torch.int64)
    # Without sampling, its pointers are never read: any tensor will do.
    drawn = sampling or FrameSampling(x, x, x, x, x, x)
    arguments = (x, next_x, table, scales_table, heads_table, embeddings_table, keys, values, residual, q, attn, gate,
                 logits, counter, counter if phase_ends is None else phase_ends, drawn.projections,
                 drawn.projections.stride(0), counter if tokens is None else tokens, drawn.targets,
                 drawn.targets.stride(0), drawn.provided, drawn.provided.stride(0), drawn.temperature, drawn.top_k,
                 drawn.noise_keys, rows, first_step, steps)
    launches = [(0, phases)] if persistent else [(phase, phase + 1) for phase in range(phases)]
    scale = head_dim**-0.5
    options = dict(num_warps=shape.num_warps)
    if x.is_cuda:
        options["maxnreg"] = _register_cap(index, shape)
        programs = _programs(_depformer_steps, (*arguments, *launches[0], eps, scale), constants, options, shape,
                             index)
    else:
        programs = INTERPRETER_PROGRAMS
    for first, end in launches:
        _depformer_steps[(programs,)](*arguments, first, end, eps, scale, **options, **constants)
    return logits, tokens


def _check_scales(layer_scales: list[torch.Tensor], layer_matrices: list[torch.Tensor], scaled: bool) -> None:
    """fp8 matrices come with one float32 scale per output row each; other matrices with none."""
    if not scaled:
        if layer_scales:
            raise ValueError("fused_depformer_step: row scales go with fp8 weights only")
        return
    if len(layer_scales) != len(layer_matrices):
        raise ValueError(f"fused_depformer_step: {len(layer_scales)} row scales for {len(layer_matrices)} fp8 matrices")
    for scales, matrix in zip(layer_scales, layer_matrices):
        if scales.dtype != torch.float32 or scales.shape != matrix.shape[:1] or not scales.is_contiguous():
            raise ValueError(f"fused_depformer_step: row scales {tuple(scales.shape)} {scales.dtype} for an fp8 "
                             f"matrix {tuple(matrix.shape)}: one contiguous float32 scale per output row")


def _scale_pointers(layer_scales: list[torch.Tensor]) -> tuple[int, ...]:
    """The scales' addresses in the weight table's layout: 0 where a layer's norms are."""
    scaled_entries = (IN_PROJ.value, OUT_PROJ.value, LINEAR_IN.value, LINEAR_OUT.value)
    pointers = []
    for first in range(0, len(layer_scales), len(scaled_entries)):
        row = [0] * WEIGHTS_PER_LAYER.value
        for which, scales in zip(scaled_entries, layer_scales[first:first + len(scaled_entries)]):
            row[which] = scales.data_ptr()
        pointers += row
    return tuple(pointers)


@fused_depformer_frame.register_fake
def _fused_depformer_frame_shape(x: torch.Tensor, projections: torch.Tensor, layer_weights: list[torch.Tensor],
                                 heads: list[torch.Tensor], embeddings: list[torch.Tensor], keys: torch.Tensor,
                                 values: torch.Tensor, eps: float, layer_scales: list[torch.Tensor],
                                 temperature: torch.Tensor, top_k: torch.Tensor, noise_keys: torch.Tensor,
                                 targets: torch.Tensor, provided: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, steps = x.shape[0], len(heads)
    return x.new_empty(rows, steps, dtype=torch.int64), x.new_empty(steps, rows, heads[0].shape[0])


@fused_depformer_step.register_fake
def _fused_depformer_step_shape(x: torch.Tensor, layer_weights: list[torch.Tensor], head: torch.Tensor,
                                keys: torch.Tensor, values: torch.Tensor, step: int, eps: float,
                                layer_scales: list[torch.Tensor]) -> torch.Tensor:
    return x.new_empty(x.shape[0], head.shape[0])
