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
def _codes_to_float(codes):
    """int32 codes in [0, 2^23) -> float32, exactly. Placing the code in the mantissa of 2^23
    and subtracting 2^23 costs one OR and one add, where the int-to-float instruction runs
    at an eighth of the FMA rate and made the first version of these kernels ALU-bound."""
    return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _chunk(w_ptr, scales_ptr, biases_ptr, x_ptr, offs_n, n_ok, x_rows, x_ok, stride_xm, kc, K,
           KIND: tl.constexpr, CHUNK: tl.constexpr):
    """Weights and inputs of one chunk of CHUNK inputs starting at kc (one scale group for the
    affine kinds, so that its scale and bias are one value per row).

    Returns (w_a, x_a, w_b, x_b): w float32 [BLOCK_N, cols], x [rows, cols] in x's dtype, such
    that the chunk's product is x_a @ w_a.T + x_b @ w_b.T. 4-bit codes come as the even and
    the odd inputs (low and high nibbles), the other kinds as one half and an all-zero other.
    """
    if KIND == 0:
        cols = tl.arange(0, CHUNK // 2)
        packed = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (kc // 2 + cols)[None, :], mask=n_ok[:, None], other=0)
        packed = packed.to(tl.int32)
        scale = tl.load(scales_ptr + offs_n * (K // CHUNK) + kc // CHUNK, mask=n_ok, other=0).to(tl.float32)[:, None]
        bias = tl.load(biases_ptr + offs_n * (K // CHUNK) + kc // CHUNK, mask=n_ok, other=0).to(tl.float32)[:, None]
        w_a = _codes_to_float(packed & 0xF) * scale + bias
        w_b = _codes_to_float(packed >> 4) * scale + bias
        x_base = x_ptr + x_rows[:, None] * stride_xm + kc + 2 * cols[None, :]
        x_a = tl.load(x_base, mask=x_ok[:, None], other=0)
        x_b = tl.load(x_base + 1, mask=x_ok[:, None], other=0)
    else:
        cols = tl.arange(0, CHUNK)
        # Rows past N are never stored, so their (unloaded) values do not matter.
        q = tl.load(w_ptr + offs_n[:, None] * K + (kc + cols)[None, :], mask=n_ok[:, None])
        if KIND == 1:
            scale = tl.load(scales_ptr + offs_n * (K // CHUNK) + kc // CHUNK, mask=n_ok, other=0).to(tl.float32)[:, None]
            bias = tl.load(biases_ptr + offs_n * (K // CHUNK) + kc // CHUNK, mask=n_ok, other=0).to(tl.float32)[:, None]
            w_a = _codes_to_float(q.to(tl.int32)) * scale + bias
        else:
            w_a = q.to(tl.float32)  # fp8: the per-row scale is applied once to the finished sum
        x_a = tl.load(x_ptr + x_rows[:, None] * stride_xm + kc + cols[None, :], mask=x_ok[:, None], other=0)
        w_b = tl.zeros_like(w_a)
        x_b = tl.zeros_like(x_a)
    return w_a, x_a, w_b, x_b


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scales_ptr, biases_ptr, out_ptr, N, K,
                 KIND: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    row = tl.arange(0, 1)
    row_ok = row < 1
    COLS: tl.constexpr = CHUNK // 2 if KIND == 0 else CHUNK
    acc = tl.zeros((BLOCK_N, COLS), dtype=tl.float32)
    k_slice = K // SPLIT_K
    for step in range(0, k_slice, BLOCK_K):
        for c in tl.static_range(BLOCK_K // CHUNK):
            kc = pid_k * k_slice + step + c * CHUNK
            w_a, x_a, w_b, x_b = _chunk(w_ptr, scales_ptr, biases_ptr, x_ptr, offs_n, n_ok, row, row_ok, 0, kc, K,
                                        KIND, CHUNK)
            acc += w_a * x_a.to(tl.float32)
            if KIND == 0:
                acc += w_b * x_b.to(tl.float32)
    out = tl.sum(acc, axis=1)
    if KIND == 2:
        out *= tl.load(scales_ptr + offs_n, mask=n_ok, other=0)
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.atomic_add(out_ptr + offs_n, out, mask=n_ok, sem="relaxed")


@triton.jit
def _dot_kernel(x_ptr, w_ptr, scales_ptr, biases_ptr, out_ptr, M, N, K, stride_xm, stride_om,
                KIND: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    for step in range(0, k_slice, BLOCK_K):
        for c in tl.static_range(BLOCK_K // CHUNK):
            kc = pid_k * k_slice + step + c * CHUNK
            w_a, x_a, w_b, x_b = _chunk(w_ptr, scales_ptr, biases_ptr, x_ptr, offs_n, n_ok, offs_m, m_ok, stride_xm,
                                        kc, K, KIND, CHUNK)
            acc = tl.dot(x_a, tl.trans(w_a.to(x_a.dtype)), acc)
            if KIND == 0:
                acc = tl.dot(x_b, tl.trans(w_b.to(x_b.dtype)), acc)
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
    if m == 1:
        block_n = 16 if n <= 4096 else 32
        return fit_config(KernelConfig(block_m=1, block_n=block_n, block_k=256, split_k=2 if n <= 4096 else 1), kind, k, 64)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    return fit_config(KernelConfig(block_m=block_m, block_n=32, block_k=128, split_k=1), kind, k, 64)


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
    config = config or default_config(kind, m, n, k)
    config = fit_config(config, kind, k, group_size)
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
            x, weight, scales, biases, out, n, k,
            KIND=int(kind), CHUNK=chunk, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            SPLIT_K=config.split_k, num_warps=config.num_warps, num_stages=config.num_stages,
        )
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
        _dot_kernel[grid](
            x, weight, scales, biases, out, m, n, k, x.stride(0), out.stride(0),
            KIND=int(kind), CHUNK=chunk, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, SPLIT_K=config.split_k, num_warps=config.num_warps, num_stages=config.num_stages,
        )
    return out if config.split_k == 1 else out.to(x.dtype)
