"""Weight-only quantized matrix products `x @ dequant(W).T` in Triton, for 1 to 64 rows of x.

One pair of kernels serves three weight formats (`WeightKind`):
- affine 4-bit: bytes [N, K/2], value 2j in the low nibble of byte j (MLX's order), one fp16
  scale and bias per group of `group_size` inputs: w = q * scale + bias;
- affine 8-bit: bytes [N, K], same scales and biases;
- fp8 e4m3: [N, K] with one float32 scale per output row, applied to the finished sum;
and plain weights as they are (bf16, float32: `PLAIN`), which the model sends here at one or
two rows only (`layers.linear`), where this GEMV streams them faster than cuBLAS.

The weights are dequantized in registers and never written back: at 1 to 64 sessions a
linear layer is bound by reading its weights, so reading 4 or 8 bits instead of 16 is the
whole gain. `_gemv_kernel` (one or two rows of x) streams its weight tiles in through
asynchronous copies a few tiles ahead, keeps a [BLOCK_N, BLOCK_K] float32 accumulator per
row and reduces it at the end; `_dot_kernel` (more rows) feeds the dequantized tile to the
tensor cores. Both can split K over several programs (`split_k`) so that narrow layers still
occupy every SM; the partial sums then meet in a float32 buffer through atomic adds.
Measurements and the reasons for this design: docs/QUANTIZATION.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from . import GEMV_MAX_ROWS, WeightKind, device_index
from .int4_mma import int4_mma_linear, output_dtype


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # 1 selects the GEMV kernel; >= 16 the tensor-core kernel
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    # GEMV only: consecutive products of a row each thread sums before its accumulator takes
    # them (1: an accumulator of the weight tile's shape; 8 or 16: 8 or 16 times fewer registers)
    chunk: int = 1


@triton.jit
def _group_scales(scales_ptr, biases_ptr, offs_n, n_ok, k0, K, GROUP_SIZE: tl.constexpr, GROUPS: tl.constexpr):
    """The fp16 scales and biases [BLOCK_N, GROUPS] of rows offs_n for the GROUPS groups from input k0."""
    group_cols = k0 // GROUP_SIZE + tl.arange(0, GROUPS)
    group_offsets = offs_n[:, None] * (K // GROUP_SIZE) + group_cols[None, :]
    scale = tl.load(scales_ptr + group_offsets, mask=n_ok[:, None], other=0)
    bias = tl.load(biases_ptr + group_offsets, mask=n_ok[:, None], other=0)
    return scale, bias


@triton.jit
def _per_column(group_values, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, COLUMNS: tl.constexpr):
    """[BLOCK_N, GROUPS] values repeated along their groups into [BLOCK_N, COLUMNS]."""
    return tl.reshape(tl.broadcast_to(group_values[:, :, None], (BLOCK_N, GROUPS, COLUMNS // GROUPS)),
                      (BLOCK_N, COLUMNS))


@triton.jit
def _int4_tile(w_ptr, scale, bias, offs_n, n_ok, k0, K, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, PTX: tl.constexpr):
    """Dequantized int4 weights [BLOCK_N, BLOCK_K] (float32) for the GEMV, with no conversion
    instruction.

    The Hopper SM converts integers to floats at 16 a clock, an eighth of its float FMA rate.
    Here each 32-bit word of 8 codes is read as 8 floats by bit operations instead: a code
    moved into bits 16-19 under the bits of 128.0 (0x43000000) is the float 128 + q, exactly.
    Then (128 + q) * scale + (bias - 128 * scale) = q * scale + bias in one FMA with one
    rounding: the same float32 as `_int4_tile_by_bytes` (bias - 128 * scale is exact for any
    group whose bias is within 2^13 of 128 scale steps: every real one). A frame's one-row
    int4 products on the H200: 3.99 -> 3.78 ms, 3.08 with launch shapes swept for it
    (docs/PERFORMANCE.md, run Q). The tensor-core kernel does not take it: its nested joins
    cost a trip through shared memory there.
    """
    WORDS: tl.constexpr = BLOCK_K // 8
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    # Rows are K/2 bytes, a multiple of 16 (K is a multiple of the group size, 32 or more).
    row_words = tl.multiple_of(K // 8, 4)
    word_cols = k0 // 8 + tl.arange(0, WORDS)
    words = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None] * row_words + word_cols[None, :],
                    mask=n_ok[:, None], other=0)
    scale = scale.to(tl.float32)
    shifted_bias = _per_column(bias.to(tl.float32) - 128.0 * scale, BLOCK_N, GROUPS, WORDS)
    scale = _per_column(scale, BLOCK_N, GROUPS, WORDS)
    # Code i of a word (input 8j + i, low nibble first) sits in bits 4i .. 4i+3.
    w0 = _nibble_weight(words << 16, scale, shifted_bias, PTX)
    w1 = _nibble_weight(words << 12, scale, shifted_bias, PTX)
    w2 = _nibble_weight(words << 8, scale, shifted_bias, PTX)
    w3 = _nibble_weight(words << 4, scale, shifted_bias, PTX)
    w4 = _nibble_weight(words, scale, shifted_bias, PTX)
    w5 = _nibble_weight(words >> 4, scale, shifted_bias, PTX)
    w6 = _nibble_weight(words >> 8, scale, shifted_bias, PTX)
    w7 = _nibble_weight(words >> 12, scale, shifted_bias, PTX)
    # Each join adds a last axis of 2; nested this way, the flattened [.., 2, 2, 2] axis runs
    # w0 .. w7: the inputs' order.
    eight = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
    return tl.reshape(eight, (BLOCK_N, BLOCK_K))


@triton.jit
def _nibble_weight(bits, scale, shifted_bias, PTX: tl.constexpr):
    """The weight whose code is in bits 16-19 of `bits` (int32): (128 + q) * scale + shifted_bias.
    PTX: the mask and the OR as one `lop3` (written as Triton operations, each with its own
    constant, they stay two instructions: a one-row int4 frame's products on the H200 3.05 ->
    2.80 ms, docs/PERFORMANCE.md run AB); Triton's interpreter, which has no PTX, runs the same
    bit operations written out."""
    if PTX:
        magic = tl.inline_asm_elementwise("lop3.b32 $0, $1, 0xF0000, 0x43000000, 0xEA;", "=r,r", [bits],
                                          dtype=tl.int32, is_pure=True, pack=1)
    else:
        magic = (bits & 0xF0000) | 0x43000000
    return magic.to(tl.float32, bitcast=True) * scale + shifted_bias


@triton.jit
def _int4_tile_by_bytes(w_ptr, scale, bias, offs_n, n_ok, k0, K, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """Dequantized int4 weights [BLOCK_N, BLOCK_K] (float32) for the tensor cores: each byte's
    two codes interleaved (input order, low nibble first) and converted to floats. Faster there
    than `_int4_tile` (frame products at 8 / 32 rows 5.63 / 6.95 ms against 7.76 / 10.80, run Q)."""
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    byte_cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(w_ptr + offs_n[:, None] * (K // 2) + byte_cols[None, :], mask=n_ok[:, None], other=0)
    q = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)
    return q * _per_column(scale.to(tl.float32), BLOCK_N, GROUPS, BLOCK_K) + _per_column(
        bias.to(tl.float32), BLOCK_N, GROUPS, BLOCK_K)


@triton.jit
def _weight_tile(w_ptr, scale, bias, offs_n, n_ok, k0, K, KIND: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TENSOR_CORES: tl.constexpr, PTX: tl.constexpr):
    """Dequantized weights [BLOCK_N, BLOCK_K] (float32) of rows offs_n, inputs k0 .. k0+BLOCK_K;
    scale and bias: the tile's groups (`_group_scales`; unused for fp8 and plain weights);
    TENSOR_CORES: for `_dot_kernel` (int4 codes are unpacked the way each kernel runs faster);
    PTX: compiled for a GPU, not run by Triton's interpreter (`_nibble_weight`)."""
    if KIND == 0 and TENSOR_CORES:
        w = _int4_tile_by_bytes(w_ptr, scale, bias, offs_n, n_ok, k0, K, GROUP_SIZE, BLOCK_N, BLOCK_K)
    elif KIND == 0:
        w = _int4_tile(w_ptr, scale, bias, offs_n, n_ok, k0, K, GROUP_SIZE, BLOCK_N, BLOCK_K, PTX)
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        # Rows past N are never stored, so their (unloaded) values do not matter.
        w = tl.load(w_ptr + offs_n[:, None] * K + cols[None, :], mask=n_ok[:, None]).to(tl.float32)
        # fp8's per-row scale is applied once to the finished sum; plain weights are as stored.
        if KIND == 1:  # int8: one scale and bias per group of GROUP_SIZE inputs, repeated along the group
            GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
            w = w * _per_column(scale.to(tl.float32), BLOCK_N, GROUPS, BLOCK_K) + _per_column(
                bias.to(tl.float32), BLOCK_N, GROUPS, BLOCK_K)
    return w


@triton.jit
def _store_row(acc, row, offs_n, n_ok, scales_ptr, out_ptr, stride_om, KIND: tl.constexpr, SPLIT_K: tl.constexpr):
    """Reduce one row's accumulator over its inputs, scale it (fp8 row scales) and store it."""
    out = tl.sum(acc, axis=1)
    if KIND == 2:
        out *= tl.load(scales_ptr + offs_n, mask=n_ok, other=0)
    if SPLIT_K == 1:
        tl.store(out_ptr + row * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(out_ptr + row * stride_om + offs_n, out, mask=n_ok, sem="relaxed")


@triton.jit
def _store_gated_row(acc, row, offs_n, n_ok, scales_ptr, out_ptr, stride_om, first_out, N, KIND: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """GATED: one row's silu(a) * b for outputs first_out .. first_out + BLOCK_N / 2, where the
    program's first BLOCK_N / 2 weight rows are a's (the gate's half of the layer) and the last
    BLOCK_N / 2 the matching rows of b (the value's half). Rounded where the readable
    `layers.silu_gate` rounds in the output dtype: the product, silu(a), silu(a) * b."""
    HALF: tl.constexpr = BLOCK_N // 2
    out = tl.sum(acc, axis=1)
    if KIND == 2:
        out *= tl.load(scales_ptr + offs_n, mask=n_ok, other=0)
    out = out.to(out_ptr.dtype.element_ty).to(tl.float32)
    # [BLOCK_N] as [2, HALF] (row 0 the gate's sums, row 1 the value's), split into the two.
    gate, value = tl.split(tl.permute(tl.reshape(out, (2, HALF)), (1, 0)))
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    offs_out = first_out + tl.arange(0, HALF)
    tl.store(out_ptr + row * stride_om + offs_out, (silu * value).to(out_ptr.dtype.element_ty), mask=offs_out < N)


@triton.jit
def _chunk_sums(products, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
    """[BLOCK_N, BLOCK_K] products summed over each run of CHUNK consecutive inputs. The tuned
    chunks are one 16-byte load of a row's weights (16 fp8 codes, 8 bf16 values), which one
    thread holds, so the sums add no exchange between threads."""
    if CHUNK == 1:
        return products
    return tl.sum(tl.reshape(products, (BLOCK_N, BLOCK_K // CHUNK, CHUNK)), axis=2)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scales_ptr, biases_ptr, out_ptr, N, K, stride_xm, stride_om,
                 KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, TWO_ROWS: tl.constexpr, CHUNK: tl.constexpr,
                 PTX: tl.constexpr, GATED: tl.constexpr = False):
    """out = x @ dequant(W).T for one row of x, or two (TWO_ROWS), each weight tile read once
    for both. Each row keeps its own accumulator [BLOCK_N, BLOCK_K / CHUNK] in the weight tile's
    register layout: a [rows, N, K] one would change that layout, and the tile would then come
    out of shared memory a byte at a time (seen in the SASS). With CHUNK 16 the fp8 GEMV at
    [16, 512] tiles holds 64 registers a thread instead of 114 (twice the programs an SM), and a
    frame's largest fp8 product, retuned with it, ran 29.8 -> 26.4 us on the H200
    (docs/PERFORMANCE.md, run X).

    GATED (SPLIT_K 1): the layer's weight holds a gated feed-forward's two halves, rows [0, N)
    for a and [N, 2N) for b, and out [rows, N] is silu(a) * b: each program reads matching rows
    of both halves, so the gate needs no kernel of its own after the product."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    if GATED:
        HALF: tl.constexpr = BLOCK_N // 2
        tile_rows = tl.arange(0, BLOCK_N)
        outputs = pid_n * HALF + tile_rows % HALF
        offs_n = outputs + (tile_rows // HALF) * N  # a's row j, then b's row N + j
        n_ok = outputs < N
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_K // CHUNK), dtype=tl.float32)
    acc_second = tl.zeros((BLOCK_N, BLOCK_K // CHUNK), dtype=tl.float32)  # the second row's (TWO_ROWS)
    k_slice = K // SPLIT_K
    k_first = pid_k * k_slice
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    if KIND < 2:
        next_scale, next_bias = _group_scales(scales_ptr, biases_ptr, offs_n, n_ok, k_first, K, GROUP_SIZE, GROUPS)
    # Triton pipelines a loop's loads (asynchronous copies NUM_STAGES - 1 tiles ahead) on its
    # own only where they feed tl.dot; here it must be asked, or every iteration waits a full
    # trip to memory.
    for step in tl.range(0, k_slice, BLOCK_K, num_stages=NUM_STAGES):
        k0 = k_first + step
        scale, bias = scales_ptr, biases_ptr  # only the affine formats have group scales
        if KIND < 2:
            # The pipeliner leaves the scales' 2-byte gathers alone: they are loaded one tile
            # ahead by hand, or each iteration would wait a trip to memory for them.
            # (The last iteration loads its own scales again rather than past the slice.)
            scale, bias = next_scale, next_bias
            k_next = tl.minimum(k0 + BLOCK_K, k_first + k_slice - BLOCK_K)
            next_scale, next_bias = _group_scales(scales_ptr, biases_ptr, offs_n, n_ok, k_next, K, GROUP_SIZE, GROUPS)
        w = _weight_tile(w_ptr, scale, bias, offs_n, n_ok, k0, K, KIND, GROUP_SIZE, BLOCK_N, BLOCK_K, False, PTX)
        cols = k0 + tl.arange(0, BLOCK_K)
        acc += _chunk_sums(w * tl.load(x_ptr + cols).to(tl.float32)[None, :], BLOCK_N, BLOCK_K, CHUNK)
        if TWO_ROWS:
            acc_second += _chunk_sums(w * tl.load(x_ptr + stride_xm + cols).to(tl.float32)[None, :],
                                      BLOCK_N, BLOCK_K, CHUNK)
    if GATED:
        _store_gated_row(acc, 0, offs_n, n_ok, scales_ptr, out_ptr, stride_om, pid_n * HALF, N, KIND, BLOCK_N)
        if TWO_ROWS:
            _store_gated_row(acc_second, 1, offs_n, n_ok, scales_ptr, out_ptr, stride_om, pid_n * HALF, N, KIND,
                             BLOCK_N)
    else:
        _store_row(acc, 0, offs_n, n_ok, scales_ptr, out_ptr, stride_om, KIND, SPLIT_K)
        if TWO_ROWS:
            _store_row(acc_second, 1, offs_n, n_ok, scales_ptr, out_ptr, stride_om, KIND, SPLIT_K)


@triton.jit
def _dot_kernel(x_ptr, w_ptr, scales_ptr, biases_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                KIND: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_slice = K // SPLIT_K
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE
    for step in range(0, k_slice, BLOCK_K):
        k0 = pid_k * k_slice + step
        scale, bias = scales_ptr, biases_ptr  # only the affine formats have group scales
        if KIND < 2:
            scale, bias = _group_scales(scales_ptr, biases_ptr, offs_n, n_ok, k0, K, GROUP_SIZE, GROUPS)
        # (int4 takes the byte path here, which has no PTX of its own)
        w = _weight_tile(w_ptr, scale, bias, offs_n, n_ok, k0, K, KIND, GROUP_SIZE, BLOCK_N, BLOCK_K, True, False)
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], mask=m_ok[:, None], other=0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    if KIND == 2:
        acc *= tl.load(scales_ptr + offs_n, mask=n_ok, other=0)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        tl.atomic_add(out_ptrs, acc, mask=ok, sem="relaxed")


# Fastest int4 launch shape per (rows bucket, N, K) of the PersonaPlex layers, from the
# sweep of bench/linear_kernels.py on an H100 80GB HBM3 (values: block_m, block_n, block_k,
# split_k). The same shapes serve int8 and fp8, which were not swept separately.
_TUNED_H100: dict[tuple[int, int, int], tuple[int, int, int, int]] = {
    (1, 12288, 4096): (1, 16, 256, 1),
    (8, 12288, 4096): (16, 32, 256, 1),
    (32, 12288, 4096): (32, 64, 128, 2),
    (64, 12288, 4096): (64, 64, 128, 2),
    (1, 4096, 4096): (1, 16, 512, 1),
    (8, 4096, 4096): (16, 32, 128, 2),
    (32, 4096, 4096): (32, 32, 256, 2),
    (64, 4096, 4096): (64, 64, 128, 4),
    (1, 22528, 4096): (1, 16, 256, 1),
    (8, 22528, 4096): (16, 64, 256, 1),
    (32, 22528, 4096): (32, 64, 128, 1),
    (64, 22528, 4096): (64, 64, 128, 1),
    (1, 4096, 11264): (1, 16, 256, 2),
    (8, 4096, 11264): (16, 32, 128, 2),
    (32, 4096, 11264): (32, 64, 256, 4),
    (64, 4096, 11264): (64, 64, 128, 4),
    (1, 1024, 4096): (1, 16, 512, 4),
    (8, 1024, 4096): (16, 32, 256, 4),
    (32, 1024, 4096): (32, 32, 256, 4),
    (64, 1024, 4096): (64, 32, 256, 4),
    (1, 3072, 1024): (1, 16, 512, 1),
    (8, 3072, 1024): (16, 32, 128, 1),
    (32, 3072, 1024): (32, 32, 256, 1),
    (64, 3072, 1024): (64, 32, 256, 1),
    (1, 1024, 1024): (1, 16, 512, 1),
    (8, 1024, 1024): (16, 32, 128, 1),
    (32, 1024, 1024): (32, 32, 256, 1),
    (64, 1024, 1024): (64, 32, 128, 4),
    (1, 5632, 1024): (1, 16, 512, 1),
    (8, 5632, 1024): (16, 32, 128, 1),
    (32, 5632, 1024): (32, 32, 256, 1),
    (64, 5632, 1024): (64, 32, 128, 1),
    (1, 1024, 2816): (1, 16, 256, 1),
    (8, 1024, 2816): (16, 32, 128, 2),
    (32, 1024, 2816): (32, 32, 128, 2),
    (64, 1024, 2816): (64, 32, 128, 2),
}


# The GEMV kernel (one or two rows), per weight format: the fastest launch shape per (N, K) of
# the sweep of `bench/linear_kernels.py --gemv` on an H200 (the LM's shapes at one row: fp8 and
# int4 twice, plain bf16 once; Mimi's float32 transformer at two rows, the rows of a frame;
# bench/results/h200-gemv-sweep.json and h200-gemv-mimi.json; values: block_n, block_k,
# split_k, num_warps, num_stages[, chunk]). Narrow tiles over long stretches of K, pipelined, keep more weight bytes in
# flight per SM than the H100 table's shapes did. The temporal layers' fp8 and bf16 shapes were swept
# again with the accumulator chunked (run X, bench/results/h200-gemv-chunked.json).
_TUNED_GEMV_H200: dict[tuple[WeightKind, int, int], tuple[int, ...]] = {
    (WeightKind.FP8, 12288, 4096): (16, 256, 1, 4, 4, 8),
    (WeightKind.FP8, 4096, 4096): (8, 512, 1, 4, 4, 16),
    (WeightKind.FP8, 22528, 4096): (8, 512, 1, 4, 4, 16),
    (WeightKind.FP8, 4096, 11264): (8, 512, 1, 4, 5, 16),
    (WeightKind.FP8, 1024, 4096): (4, 2048, 1, 4, 3),
    # A frame's 8 depformer inputs as one product (run Y; the default shape: fp8 12.1, bf16 18.7 us).
    (WeightKind.FP8, 8192, 4096): (16, 256, 1, 4, 4, 16),  # 11.1 us
    (WeightKind.PLAIN, 8192, 4096): (16, 256, 1, 4, 4, 8),  # 18.4 us
    # int4 swept again (run Q) once its codes were read by bit operations, the depformer's
    # products too (int4 steps run them through the GEMV at one row): a frame's 3.78 -> 3.08 ms.
    (WeightKind.INT4, 12288, 4096): (16, 512, 1, 4, 4),
    (WeightKind.INT4, 4096, 4096): (16, 512, 1, 4, 3),
    (WeightKind.INT4, 22528, 4096): (16, 512, 1, 4, 3),
    (WeightKind.INT4, 4096, 11264): (8, 1024, 1, 4, 3),
    (WeightKind.INT4, 1024, 4096): (4, 2048, 1, 8, 1),
    (WeightKind.INT4, 3072, 1024): (2, 512, 1, 2, 1),
    (WeightKind.INT4, 1024, 1024): (2, 512, 1, 2, 3),
    (WeightKind.INT4, 5632, 1024): (8, 512, 1, 2, 1),
    (WeightKind.INT4, 1024, 2816): (2, 256, 1, 2, 3),
    (WeightKind.PLAIN, 12288, 4096): (16, 256, 1, 4, 3),
    (WeightKind.PLAIN, 4096, 4096): (8, 512, 1, 4, 4, 8),
    (WeightKind.PLAIN, 22528, 4096): (8, 1024, 1, 4, 5, 8),
    (WeightKind.PLAIN, 4096, 11264): (8, 512, 1, 4, 3, 8),
    (WeightKind.PLAIN, 1024, 4096): (4, 512, 1, 4, 6),
    (WeightKind.PLAIN, 1536, 512): (4, 512, 1, 2, 1),  # Mimi's transformer (float32, two rows)
    (WeightKind.PLAIN, 512, 512): (2, 512, 1, 4, 1),
    (WeightKind.PLAIN, 2048, 512): (4, 512, 1, 2, 1),
    (WeightKind.PLAIN, 512, 2048): (2, 512, 1, 2, 3),
}


# The several-row kernel's launch shapes that beat the H100 table's by 2 % or more on an H200
# (the sweep of `bench/linear_kernels.py --dot`, int4 and fp8 at 8, 32 and 64 rows over tiles up
# to 256 columns and 8 warps, bench/results/h200-dot-sweep.json; key: kind, rows bucket, N, K;
# values: block_m, block_n, block_k, split_k, num_warps, num_stages). Elsewhere the H100 shape
# was also the H200's fastest, or within 2 %; int8 was not swept.
_TUNED_DOT_H200: dict[tuple[WeightKind, int, int, int], tuple[int, int, int, int, int, int]] = {
    (WeightKind.INT4, 8, 4096, 4096): (16, 32, 256, 2, 4, 3),  # 15.84 -> 14.68 us
    (WeightKind.INT4, 32, 4096, 4096): (32, 64, 256, 4, 4, 3),  # 20.33 -> 18.31 us
    (WeightKind.INT4, 8, 22528, 4096): (16, 32, 256, 1, 4, 3),  # 49.79 -> 48.17 us
    (WeightKind.INT4, 8, 4096, 11264): (16, 32, 256, 2, 4, 3),  # 35.18 -> 31.85 us
    (WeightKind.INT4, 64, 4096, 11264): (64, 128, 64, 8, 4, 4),  # 54.27 -> 48.45 us
    (WeightKind.INT4, 8, 3072, 1024): (16, 32, 256, 1, 4, 3),  # 6.09 -> 5.56 us
    (WeightKind.INT4, 8, 1024, 1024): (16, 32, 256, 1, 4, 3),  # 5.9 -> 5.39 us
    (WeightKind.INT4, 32, 1024, 1024): (32, 32, 256, 4, 4, 3),  # 7.06 -> 6.46 us
    (WeightKind.INT4, 64, 1024, 1024): (64, 32, 256, 4, 4, 3),  # 7.24 -> 6.9 us
    (WeightKind.INT4, 8, 5632, 1024): (16, 32, 256, 1, 4, 3),  # 6.95 -> 6.63 us
    (WeightKind.INT4, 32, 5632, 1024): (32, 64, 256, 1, 4, 3),  # 9.71 -> 8.77 us
    (WeightKind.FP8, 64, 12288, 4096): (64, 128, 128, 2, 4, 3),  # 38.62 -> 35.05 us
    (WeightKind.FP8, 8, 4096, 4096): (16, 32, 256, 1, 4, 3),  # 13.54 -> 11.23 us
    (WeightKind.FP8, 32, 4096, 4096): (32, 64, 256, 2, 4, 3),  # 14.64 -> 13.38 us
    (WeightKind.FP8, 64, 4096, 4096): (64, 64, 256, 2, 4, 3),  # 17.18 -> 16.01 us
    (WeightKind.FP8, 32, 22528, 4096): (32, 64, 256, 1, 4, 3),  # 41.17 -> 37.87 us
    (WeightKind.FP8, 64, 22528, 4096): (64, 128, 64, 1, 4, 4),  # 77.89 -> 53.71 us
    (WeightKind.FP8, 8, 4096, 11264): (16, 64, 256, 2, 4, 3),  # 28.1 -> 22.86 us
    (WeightKind.FP8, 32, 4096, 11264): (32, 64, 256, 2, 4, 3),  # 34.21 -> 26.96 us
    (WeightKind.FP8, 64, 4096, 11264): (64, 64, 256, 2, 4, 3),  # 38.02 -> 34.67 us
    (WeightKind.FP8, 8, 3072, 1024): (16, 32, 256, 1, 4, 3),  # 5.35 -> 4.53 us
    (WeightKind.FP8, 8, 1024, 1024): (16, 32, 256, 1, 4, 3),  # 5.01 -> 4.16 us
    (WeightKind.FP8, 64, 1024, 1024): (64, 32, 256, 1, 4, 3),  # 6.69 -> 5.8 us
    (WeightKind.FP8, 8, 5632, 1024): (16, 32, 256, 1, 4, 3),  # 5.9 -> 5.42 us
    (WeightKind.FP8, 32, 5632, 1024): (32, 64, 256, 1, 4, 3),  # 7.5 -> 6.84 us
    (WeightKind.FP8, 64, 5632, 1024): (64, 64, 256, 1, 4, 3),  # 8.47 -> 8.3 us
    (WeightKind.FP8, 8, 1024, 2816): (16, 32, 256, 1, 4, 3),  # 9.09 -> 7.6 us
    (WeightKind.FP8, 32, 1024, 2816): (32, 32, 256, 1, 4, 3),  # 10.08 -> 9.7 us
}


def _rows_bucket(m: int) -> int:
    return next(b for b in (8, 32, 64, 1 << 30) if m <= b)


def default_config(kind: WeightKind, m: int, n: int, k: int) -> KernelConfig:
    """The launch shape measured fastest for this product: on an H200 for the GEMV (up to
    GEMV_MAX_ROWS rows) of fp8, int4 or plain weights and for the several-row kernel where its
    sweep found better than the H100's, else on an H100 (docs/QUANTIZATION.md).

    Shapes outside the tables (tiny test models, another model) get the rule the tables
    mostly follow: 16 rows per GEMV program, 32 per tensor-core program, and K split over
    2 or 4 programs when the layer is much deeper than wide.
    """
    split_k = min(4, 1 << max(0, (k // n).bit_length() - 1)) if k >= 4096 else 1
    if m <= GEMV_MAX_ROWS:
        tuned_gemv = _TUNED_GEMV_H200.get((kind, n, k))
        if tuned_gemv is not None:
            return KernelConfig(1, *tuned_gemv)
        return KernelConfig(block_m=1, block_n=16, block_k=256, split_k=split_k)
    bucket = _rows_bucket(m)
    tuned_h200 = _TUNED_DOT_H200.get((kind, bucket, n, k))
    if tuned_h200 is not None:
        return KernelConfig(*tuned_h200)
    tuned = _TUNED_H100.get((bucket, n, k))
    if tuned is not None:
        return KernelConfig(*tuned)
    return KernelConfig(block_m=min(bucket, 64) if bucket > 8 else 16, block_n=32, block_k=128, split_k=split_k)


def fit_config(config: KernelConfig, kind: WeightKind, k: int, group_size: int) -> KernelConfig:
    """Shrink split_k, then block_k, until they tile K exactly (small test models)."""
    split_k, block_k = config.split_k, config.block_k
    smallest_block_k = group_size if kind != WeightKind.FP8 else 16
    while split_k > 1 and k % (split_k * block_k):
        split_k //= 2
    while block_k > smallest_block_k and k % block_k:
        block_k //= 2
    if k % block_k or block_k < smallest_block_k:
        raise ValueError(f"no kernel tiling for K={k} (group size {group_size})")
    return replace(config, block_k=block_k, split_k=split_k, chunk=min(config.chunk, block_k))


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    biases: torch.Tensor | None,
    kind: WeightKind,
    group_size: int,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (rows contiguous) @ dequant(weight).T -> [M, N] in x's dtype (INT4_MMA: float32
    where its split K is added up by atomic adds, `int4_mma.sums_in_float32`; the caller casts).

    weight: uint8 [N, K/2] (INT4) or [N, K] (INT8), float8_e4m3fn [N, K] (FP8), a float dtype
    [N, K] (PLAIN); scales/biases: [N, K/group_size] (affine), scales float32 [N] and biases
    None (FP8), both None (PLAIN). INT4_MMA: int32 words [N, K/8] and their fp16 scales and
    biases [N, 2K/group_size] in fragment order, biases None; `int4_mma.int4_mma_linear` runs it.
    """
    if kind == WeightKind.INT4_MMA:  # every row count: the layer holds only the tensor-core layout
        return int4_mma_linear(x, weight, scales, group_size)
    m, k = x.shape
    n = weight.shape[0]
    if kind == WeightKind.INT4 and weight.data_ptr() % 4:
        # The GEMV reads the codes as 32-bit words (`_int4_tile`).
        raise ValueError("int4 weights must start on a 4-byte boundary: pass a tensor of its own, not a byte-offset view")
    config = fit_config(config or default_config(kind, m, n, k), kind, k, group_size)
    # Pointers the kernel never reads for this kind: any tensor will do.
    scales = weight if scales is None else scales
    biases = scales if biases is None else biases
    if config.split_k == 1:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        out = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    if config.block_m == 1:
        _launch_gemv(x, weight, scales, biases, out, n, kind, group_size, config, gated=False)
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
        _dot_kernel[grid](
            x, weight, scales, biases, out, m, n, k, x.stride(0), out.stride(0),
            KIND=int(kind), GROUP_SIZE=group_size, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, SPLIT_K=config.split_k, num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out if config.split_k == 1 else out.to(x.dtype)


def quantized_gated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None,
    biases: torch.Tensor | None,
    kind: WeightKind,
    group_size: int,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """silu(a) * b where [a | b] = x @ dequant(weight).T, a gated feed-forward's first product
    and its gate in one GEMV launch (one or two rows of x): [M, N / 2] in x's dtype. Arguments
    as `quantized_linear`'s; the launch shape is the plain product's, without a split of K
    (the gate needs each sum whole). In the one-row frame this removes the gate's own kernel
    from each of the temporal layers. INT4_MMA (any number of rows): the int4 tensor-core
    kernel with the gate in its epilogue, on a weight whose halves `to_fragment_order(...,
    gated=True)` interleaved (80 gate kernels fewer in a frame, docs/PERFORMANCE.md run AI)."""
    m, k = x.shape
    n = weight.shape[0]
    if n % 2:
        raise ValueError(f"a gated product needs an even number of weight rows (two halves), got {n}")
    if kind == WeightKind.INT4_MMA:  # the layer's halves interleaved (`to_fragment_order(..., gated=True)`)
        return int4_mma_linear(x, weight, scales, group_size, gated=True)
    config = fit_config(replace(config or default_config(kind, m, n, k), split_k=1), kind, k, group_size)
    if config.block_m != 1 or config.block_n < 2:
        raise ValueError(f"a gated product runs on the GEMV kernel with at least 2 weight rows a program, not {config}")
    scales = weight if scales is None else scales
    biases = scales if biases is None else biases
    out = torch.empty((m, n // 2), device=x.device, dtype=x.dtype)
    _launch_gemv(x, weight, scales, biases, out, n // 2, kind, group_size, config, gated=True)
    return out


def _launch_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, out: torch.Tensor,
                 outputs: int, kind: WeightKind, group_size: int, config: KernelConfig, gated: bool) -> None:
    """The GEMV kernel over `outputs` outputs (with `gated`, each from two weight rows)."""
    m, k = x.shape
    if m > GEMV_MAX_ROWS:
        raise ValueError(f"the GEMV kernel takes at most {GEMV_MAX_ROWS} rows of x, got {m}")
    outputs_per_program = config.block_n // 2 if gated else config.block_n
    grid = (triton.cdiv(outputs, outputs_per_program), config.split_k)
    _gemv_kernel[grid](
        x, weight, scales, biases, out, outputs, k, x.stride(0), out.stride(0),
        KIND=int(kind), GROUP_SIZE=group_size, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        SPLIT_K=config.split_k, NUM_STAGES=config.num_stages, TWO_ROWS=m == 2, CHUNK=config.chunk, PTX=x.is_cuda,
        GATED=gated, num_warps=config.num_warps,
    )


def _product_op(name: str, product: Callable[..., torch.Tensor], outputs: Callable[[int], int],
                sums_dtype: Callable[[torch.Tensor, int, int], torch.dtype]):
    """`product` (`quantized_linear` or `quantized_gated_linear`) with the default tiling as the
    custom op personaplex::`name`, so that torch.compile keeps each product as one opaque call
    with a known output ([M, outputs(N)] of sums_dtype(x, N, kind)) when it compiles the whole
    frame. `kind` is a `WeightKind` value."""

    def op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, biases: torch.Tensor | None,
           kind: int, group_size: int) -> torch.Tensor:
        return product(x, weight, scales, biases, WeightKind(kind), group_size)

    def shape(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor | None, biases: torch.Tensor | None,
              kind: int, group_size: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], outputs(weight.shape[0]), dtype=sums_dtype(x, weight.shape[0], kind))

    registered = torch.library.custom_op(f"personaplex::{name}", op, mutates_args=())
    registered.register_fake(shape)
    return registered


def _linear_dtype(x: torch.Tensor, n: int, kind: int) -> torch.dtype:
    """What `quantized_linear` returns: x's dtype, or for the int4 tensor-core kernel its own
    choice (float32 sums where atomic adds sum its split K)."""
    if kind != WeightKind.INT4_MMA:
        return x.dtype
    return output_dtype(x.shape[0], n, x.shape[1], device_index(x.device), x.dtype)


# The entry points the layers call.
quantized_linear_op = _product_op("quantized_linear", quantized_linear, lambda rows: rows, _linear_dtype)
quantized_gated_linear_op = _product_op("quantized_gated_linear", quantized_gated_linear, lambda rows: rows // 2,
                                        lambda x, n, kind: x.dtype)
