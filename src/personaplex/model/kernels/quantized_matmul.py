"""Weight-only quantized matrix products `x @ dequant(W).T` in Triton, for small batches.

One pair of kernels serves three weight formats (`WeightKind`):
- affine 4-bit: bytes [N, K/2], value 2j in the low nibble of byte j (MLX's order), one fp16
  scale and bias per group of `group_size` inputs: w = q * scale + bias;
- affine 8-bit: bytes [N, K], same scales and biases;
- fp8 e4m3: [N, K] with one float32 scale per output row, applied to the finished sum.

The weights are dequantized in registers and never written back: at 1 to 64 sessions a
linear layer is bound by reading its weights, so reading 4 or 8 bits instead of 16 is the
whole gain. `gemv` (one row of x) keeps a [BLOCK_N, BLOCK_K] float32 accumulator and reduces
it at the end; `dot` (several rows) feeds the dequantized tile to the tensor cores. Both can
split K over several programs (`split_k`) so that narrow layers still occupy every SM; the
partial sums then meet in a float32 buffer through atomic adds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


class WeightKind(enum.IntEnum):
    INT4 = 0
    INT8 = 1
    FP8 = 2


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # 1 selects the GEMV kernel; >= 16 the tensor-core kernel
    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _chunk(w_ptr, stride_wn, scales_ptr, biases_ptr, offs_n, n_ok, kc, K,
           KIND: tl.constexpr, CHUNK: tl.constexpr, EVEN_N: tl.constexpr):
    """Dequantized weights [BLOCK_N, CHUNK] (float32) of rows offs_n, inputs kc .. kc+CHUNK.

    The kernels are bound by instruction issue, not by memory, unless dequantizing costs
    only a few instructions per weight, hence:
    - a chunk of an affine kind is one scale group, so its scale and bias are one value per
      row, broadcast along the row;
    - a code q is turned into a float without the slow int-to-float instruction, by writing
      it into the top mantissa bits of 1.0: f = 1 + q / 2^bits (one shift and one LOP3), and
      w = q * scale + bias = f * (2^bits scale) + (bias - 2^bits scale), one FMA;
    - EVEN_N (N a multiple of BLOCK_N, true of every layer of the real model) drops the row
      masks, and the alignment hints let each thread load 16 bytes at once.
    """
    if KIND == 0:
        cols = tl.multiple_of(kc // 2, CHUNK // 2) + tl.arange(0, CHUNK // 2)
        if EVEN_N:
            packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :])
        else:
            packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :], mask=n_ok[:, None], other=0)
        packed = packed.to(tl.int32)
        # interleave puts each byte's two codes side by side: input order, low nibble first.
        mantissa = tl.interleave(((packed & 0xF) << 19) | 0x3F800000, ((packed >> 4) << 19) | 0x3F800000)
    else:
        cols = tl.multiple_of(kc, CHUNK) + tl.arange(0, CHUNK)
        if EVEN_N:
            codes = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :])
        else:
            # Rows past N are never stored, so their (unloaded) values do not matter.
            codes = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :], mask=n_ok[:, None])
        if KIND == 1:
            mantissa = (codes.to(tl.int32) << 15) | 0x3F800000
    if KIND == 2:
        w = codes.to(tl.float32)  # fp8: the per-row scale is applied once to the finished sum
    else:
        levels: tl.constexpr = 16.0 if KIND == 0 else 256.0
        group = offs_n * (K // CHUNK) + kc // CHUNK
        if EVEN_N:
            scale = tl.load(scales_ptr + group).to(tl.float32) * levels
            bias = tl.load(biases_ptr + group).to(tl.float32) - scale
        else:
            scale = tl.load(scales_ptr + group, mask=n_ok, other=0).to(tl.float32) * levels
            bias = tl.load(biases_ptr + group, mask=n_ok, other=0).to(tl.float32) - scale
        w = mantissa.to(tl.float32, bitcast=True) * scale[:, None] + bias[:, None]
    return w


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, stride_wn, scales_ptr, biases_ptr, out_ptr, N, K,
                 KIND: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_N, CHUNK), dtype=tl.float32)
    k_slice = K // SPLIT_K
    for step in range(0, k_slice, BLOCK_K):
        for c in tl.static_range(BLOCK_K // CHUNK):
            kc = tl.multiple_of(pid_k * k_slice + step + c * CHUNK, CHUNK)
            w = _chunk(w_ptr, stride_wn, scales_ptr, biases_ptr, offs_n, n_ok, kc, K, KIND, CHUNK, EVEN_N)
            x = tl.load(x_ptr + kc + tl.arange(0, CHUNK)).to(tl.float32)
            acc += w * x[None, :]
    out = tl.sum(acc, axis=1)
    if KIND == 2:
        out *= tl.load(scales_ptr + offs_n, mask=n_ok, other=0)
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(out_ptr + offs_n, out, mask=n_ok, sem="relaxed")


@triton.jit
def _dot_kernel(x_ptr, w_ptr, stride_wn, scales_ptr, biases_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                KIND: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_slice = K // SPLIT_K
    for step in range(0, k_slice, BLOCK_K):
        for c in tl.static_range(BLOCK_K // CHUNK):
            kc = tl.multiple_of(pid_k * k_slice + step + c * CHUNK, CHUNK)
            w = _chunk(w_ptr, stride_wn, scales_ptr, biases_ptr, offs_n, n_ok, kc, K, KIND, CHUNK, EVEN_N)
            cols = kc + tl.arange(0, CHUNK)
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


def default_config(kind: WeightKind, m: int, n: int, k: int) -> KernelConfig:
    """The launch shape measured fastest on an H100 for this product (docs/QUANTIZATION.md)."""
    narrow = n <= 4096  # too few row blocks to fill 132 SMs without splitting K
    if m == 1:
        return KernelConfig(block_m=1, block_n=16, block_k=256, split_k=2 if narrow and k > 1024 else 1)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    return KernelConfig(block_m=block_m, block_n=64, block_k=128, split_k=2 if narrow and k > 1024 else 1)


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
    return KernelConfig(config.block_m, config.block_n, block_k, split_k, config.num_warps, config.num_stages)


def quantized_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    kind: WeightKind,
    group_size: int,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16, rows contiguous) @ dequant(weight).T -> [M, N] in x's dtype.

    weight: uint8 [N, K/2] (INT4) or [N, K] (INT8), float8_e4m3fn [N, K] (FP8);
    scales/biases: [N, K/group_size] (affine) or scales float32 [N] and biases None (FP8).
    """
    m, k = x.shape
    n = weight.shape[0]
    config = fit_config(config or default_config(kind, m, n, k), kind, k, group_size)
    biases = scales if biases is None else biases  # FP8 reads no biases; any pointer will do
    # Affine kinds work one scale group at a time; fp8 has no groups and takes a whole block.
    chunk = config.block_k if kind == WeightKind.FP8 else group_size
    if config.split_k == 1:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    else:
        out = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    if config.block_m == 1:
        if m != 1:
            raise ValueError("the GEMV kernel takes one row of x")
        grid = (triton.cdiv(n, config.block_n), config.split_k)
        _gemv_kernel[grid](
            x, weight, weight.stride(0), scales, biases, out, n, k,
            KIND=int(kind), CHUNK=chunk, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            SPLIT_K=config.split_k, EVEN_N=n % config.block_n == 0, num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
        _dot_kernel[grid](
            x, weight, weight.stride(0), scales, biases, out, m, n, k, x.stride(0), out.stride(0),
            KIND=int(kind), CHUNK=chunk, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, SPLIT_K=config.split_k, EVEN_N=n % config.block_n == 0, num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out if config.split_k == 1 else out.to(x.dtype)
