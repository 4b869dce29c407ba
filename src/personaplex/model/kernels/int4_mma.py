"""int4 weight-only products on the tensor cores, in CUDA C compiled at run time (NVRTC).

Why not Triton: at 8 to 64 rows the Triton int4 kernel (`quantized_matmul._dot_kernel`) waits
on its own load -> convert -> multiply chain (about 1.5 warp instructions a clock an SM of the
4 it could issue, docs/QUANTIZATION.md run AB), and it was slower than cuBLAS reading bf16
weights from 8 rows on. This kernel keeps the weights streaming while it multiplies:

- **Weights in fragment order.** `to_fragment_order` rearranges MLX's int4 codes once, at
  load, so that each lane's 32-bit word holds exactly the 8 codes of its `mma.m16n8k16` A
  fragment (the weights are A, 16 output rows by 16 inputs; x is B, 8 of its rows a tile: the
  small side of the product sits in the instruction's narrow n). Each lane reads one 16-byte
  vector per 16 rows x 64 inputs, every byte of it used, with no exchange between lanes.
- **One pipeline of asynchronous copies** (`cp.async`, STAGES chunks of 64 inputs in flight)
  brings x's chunk, the weights and their group scales into shared memory while the warps
  multiply the chunk that has arrived; one `ldmatrix` reads the B fragments of two tiles of x.
  Each thread's sources are planned once and moved on a chunk per copy, with no predicate or
  select in the loop, and the outputs are written at constant offsets from a lane's first
  (docs/PERFORMANCE.md, run AH: copies and writes were a quarter of the 64-row kernel's
  instructions).
- **Codes to numbers by bit operations**, one of two ways (`MmaConfig.dequantize`, chosen by
  rows of x):
  - *scales once a group* (few rows): one `lop3` puts codes r and r + 4 of a word under the
    bits of bf16 128.0, the fragment's register r as the pair 128 + q; the mma sums (128 + q)
    * x over a group, a second mma with an all-ones A sums x over it, and at the group's end
    scale * the first + (bias - 128 * scale) * the second is the group's sum((q * scale +
    bias) * x): no instruction per weight beyond the `lop3`, and each weight exact. The group
    and x sums cost registers and a third more products, which is what many rows cannot afford;
  - *weights dequantized in registers* (from DEQUANTIZE_FROM_ROWS rows): three shifts of a word
    bring each of its codes to bits 16-19 or 12-15, where one `lop3` makes it the float32 128 +
    q or 128 + q / 16; one fma with the matching scale and shifted bias is q * scale + bias,
    rounded once to bf16 (the Triton kernels' rounding), straight into the one set of sums.
- **K split over the blocks of a tile**, their sums added up either in a thread-block
  cluster through distributed shared memory (`cluster_sums`, Hopper: no extra kernels) or by
  atomic adds into a zeroed float32 buffer (one more kernel, the zeroing, but no block waits on
  another: faster for some shapes at 64 rows), returned as float32 sums for the caller to cast:
  in a compiled frame the next kernel does it (`sums_in_float32`).
- **The gate in the epilogue** (`gated`): a gated feed-forward's first layer holds its halves
  a, b interleaved, 8 rows of each a strip (`interleave_halves`), so that the lane summing a's
  row sums b's too and writes silu(a) * b: no gate kernel after the product.

A frame's temporal int4 products on an H200, 2 / 8 / 32 / 64 rows (docs/PERFORMANCE.md, run
AI, the gated ones with their gate): 2.80 / 3.90 / 4.95 / 5.93 ms on the Triton kernels, 1.76 /
1.80 / 2.82 / 3.91 here, cuBLAS reading bf16 3.95 / 4.12 / 4.20 / 4.17 (and a gate kernel after
each gated product).

Warps split a block's 16-row strips (WARPS_N) and each 64-input chunk's four 16-input steps
(WARPS_K, summed in shared memory at the end); blocks split N, then 64-row chunks of x, then K.
Needs a GPU of compute capability 8.0 or newer (bf16 `mma.sync`; clusters 9.0), N a multiple
of 16 and K of 64.
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings
from dataclasses import dataclass, replace

import torch

from . import device_index

CHUNK_INPUTS = 64  # inputs a pipeline stage brings in (4 steps of the mma's 16)
STRIP_ROWS = 16  # output rows of one A fragment
MAX_TILE_ROWS = 64  # rows of x a block takes (8 mma tiles of 8); more rows take more blocks
MAX_INDEX = 2**31 - 1  # the kernel's indices of x's bytes and of outputs are 32-bit


@dataclass(frozen=True)
class MmaConfig:
    warps_n: int = 4  # warps side by side over the block's strips
    warps_k: int = 1  # warps sharing each chunk's four 16-input steps
    strips: int = 1  # 16-row strips each warp multiplies
    stages: int = 4  # chunks in flight
    split_k: int = 1  # blocks sharing K
    # Weights to bf16 in registers, q * scale + bias in float32 rounded once (the Triton kernels'
    # rounding), instead of the exact products with scales once a group: no group sums, no x
    # sums, a third fewer products, for many rows of x where those registers cost occupancy.
    dequantize: bool = False
    min_blocks: int = 0  # blocks an SM the registers are capped for (0: the compiler's choice)
    # With K split: the blocks of a tile as one cluster adding up their sums in distributed
    # shared memory, or else atomic adds into a zeroed float32 buffer (one more kernel, but
    # blocks that never wait on one another: faster at 64 rows of x), returned uncast.
    cluster_sums: bool = True


def fits(out_features: int, in_features: int) -> bool:
    """Whether a layer's shape can take fragment order."""
    return out_features % STRIP_ROWS == 0 and in_features % CHUNK_INPUTS == 0


# --------------------------------------------------------------------------- layout


def interleave_halves(rows: torch.Tensor) -> torch.Tensor:
    """A gated layer's rows [a; b] (two halves of N / 2) -> each 16-row strip 8 rows of a, then
    the same 8 of b: the lane that sums a's row g of a strip sums b's too (row g + 8), and
    writes silu(a) * b (the kernel's GATED epilogue)."""
    return rows.reshape(2, rows.shape[0] // 16, 8, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def separate_halves(rows: torch.Tensor) -> torch.Tensor:
    """Inverse of `interleave_halves`."""
    return rows.reshape(rows.shape[0] // 16, 2, 8, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def to_fragment_order(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                      gated: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes uint8 [N, K] (one code a byte) and fp16 scales, biases [N, K/G] -> the
    kernel's operands: words int32 [N, K/8] and scale_bias fp16 [N, 2K/G]. `gated`: a gated
    layer's rows, its halves interleaved first (`interleave_halves`). In memory:

    - words [N/16 strips][K/64 chunks][32 lanes][4 steps]: lane 4g + t's word of step s holds
      its A fragment of rows 16 strip + (g, g + 8), inputs 64 chunk + 16 s + (2t, 2t + 1,
      2t + 8, 2t + 9): register j of the fragment (j = row half + 2 * input half) takes codes
      j (first input) and j + 4 (second) of the word, code i in bits 4i .. 4i + 3;
    - scale_bias [N/16][K/G][8][4]: for lanes 4g + t, (scale, bias) of row g then of row g + 8.
    """
    n, k = codes.shape
    if not fits(n, k):
        raise ValueError(f"fragment order needs N % {STRIP_ROWS} == 0 and K % {CHUNK_INPUTS} == 0, got {n} x {k}")
    if gated:
        codes, scales, biases = interleave_halves(codes), interleave_halves(scales), interleave_halves(biases)
    # n = 16 strip + 8 h + g; k = 64 chunk + 16 step + 8 e + 2 t + p
    q = codes.to(torch.int32).reshape(n // 16, 2, 8, k // 64, 4, 2, 4, 2)
    #                                  strip h  g  chunk    step e  t  p
    q = q.permute(0, 3, 2, 6, 4, 7, 5, 1)  # strip, chunk, g, t, step | p, e, h: code 4p + 2e + h
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=codes.device)
    words = (q.reshape(*q.shape[:5], 8) << shifts).sum(dim=-1, dtype=torch.int32)
    groups = scales.shape[1]
    pairs = torch.stack((scales, biases), dim=-1).reshape(n // 16, 2, 8, groups, 2)  # strip, h, g, group, (s, b)
    scale_bias = pairs.permute(0, 3, 2, 1, 4)  # strip, group, g, h, (s, b)
    return words.reshape(n, k // 8).contiguous(), scale_bias.reshape(n, 2 * groups).contiguous()


def from_fragment_order(words: torch.Tensor, scale_bias: torch.Tensor,
                        gated: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `to_fragment_order`: -> codes uint8 [N, K], scales and biases fp16 [N, K/G]."""
    n, k = words.shape[0], words.shape[1] * 8
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nibbles = (words.reshape(n // 16, k // 64, 8, 4, 4, 1) >> shifts) & 0xF  # strip, chunk, g, t, step, code
    q = nibbles.reshape(n // 16, k // 64, 8, 4, 4, 2, 2, 2)  # ..., p, e, h
    codes = q.permute(0, 7, 2, 1, 4, 6, 3, 5).reshape(n, k)  # strip, h, g, chunk, step, e, t, p
    groups = scale_bias.shape[1] // 2
    pairs = scale_bias.reshape(n // 16, groups, 8, 2, 2).permute(0, 3, 2, 1, 4)  # strip, h, g, group, (s, b)
    pairs = pairs.reshape(n, groups, 2)
    rows = (codes.to(torch.uint8), pairs[..., 0], pairs[..., 1])
    return tuple((separate_halves(part) if gated else part).contiguous() for part in rows)


# --------------------------------------------------------------------------- the kernel

_SOURCE = r"""
typedef unsigned int u32;
typedef unsigned short u16;

#define KC 64
#define THREADS (WARPS_N * WARPS_K * 32)
#define BLOCK_STRIPS (WARPS_N * STRIPS)
#define X_ROWS (M_TILES * 8)
#define X_STRIDE_WORDS 36  /* a row of the x chunk: 64 bf16 and 8 of padding, so that the 8 rows
                              of a B fragment fall in different banks */
#define X_BYTES (X_ROWS * X_STRIDE_WORDS * 4)
#define W_BYTES (BLOCK_STRIPS * 512)
#define SB_ENTRIES (GROUP < KC ? KC / GROUP : 1)
#define SB_BYTES (BLOCK_STRIPS * SB_ENTRIES * 64)
#define STAGE_BYTES (X_BYTES + W_BYTES + SB_BYTES)
#define X_PIECES (X_ROWS * 8)                    /* 16-byte copies a stage: x, weights, scales */
#define W_PIECES (BLOCK_STRIPS * 32)
#define SB_PIECES (BLOCK_STRIPS * SB_ENTRIES * 4)
#define CEIL(a, b) (((a) + (b) - 1) / (b))
#define X_COPIES CEIL(X_PIECES, THREADS)         /* pieces of each kind a thread copies a stage */
#define W_COPIES CEIL(W_PIECES, THREADS)
#define SB_COPIES CEIL(SB_PIECES, THREADS)

__device__ __forceinline__ void copy16(u32 dst, const void* src, u32 bytes = 16) {
    // Asynchronous 16-byte copy to shared memory, around the L1: `bytes` of src, zeros after.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ float half_to_float(u32 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)h));
    return f;
}

__device__ __forceinline__ u32 codes_plus_128(u32 bits) {
    // Codes in bits 0-3 and 16-19 of `bits`, under the bits of bf16 128.0: the pair 128 + q.
    u32 r;
    asm("lop3.b32 %0, %1, 0x000F000F, 0x43004300, 0xEA;" : "=r"(r) : "r"(bits));
    return r;
}

__device__ __forceinline__ void load_scales(const uint2* sbs, int entry, int g, float scale[2], float shifted_bias[2]) {
    // (scale, bias - 128 * scale) of rows g and g + 8 of a strip: the affine map of a code seen
    // as 128 + q (codes_plus_128).
    const uint2 p = sbs[entry * 8 + g];
    scale[0] = half_to_float(p.x & 0xFFFF);
    scale[1] = half_to_float(p.y & 0xFFFF);
    shifted_bias[0] = fmaf(-128.f, scale[0], half_to_float(p.x >> 16));
    shifted_bias[1] = fmaf(-128.f, scale[1], half_to_float(p.y >> 16));
}

__device__ __forceinline__ u16 to_bf16(float v) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

__device__ __forceinline__ u32 to_bf16_pair(float low, float high) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(high), "f"(low));
    return r;
}

__device__ __forceinline__ float rounded_to_bf16(float v) {
    return __uint_as_float((u32)to_bf16(v) << 16);
}

__device__ __forceinline__ float gated_sum(float gate, float value) {
    // silu(a) * b of a gated layer's two halves (GATED), each first rounded to bf16 as the plain
    // product writes them, then in float32 as the compiled frame's gate kernel computes it.
    const float a = rounded_to_bf16(gate);
    return a / (1.f + __expf(-a)) * rounded_to_bf16(value);
}

__device__ __forceinline__ void load_dequantize_scales(const uint2* sbs, int entry, int g, float scale[2],
                                                       float shifted_bias[2]) {
    // The affine maps of codes as `dequantize_word` reads them: 128 + q for row g, so (scale,
    // bias - 128 * scale); 128 + q / 16 for row g + 8, so (16 * scale, bias - 2048 * scale).
    const uint2 p = sbs[entry * 8 + g];
    const float row_scale = half_to_float(p.y & 0xFFFF);
    scale[0] = half_to_float(p.x & 0xFFFF);
    shifted_bias[0] = fmaf(-128.f, scale[0], half_to_float(p.x >> 16));
    scale[1] = 16.f * row_scale;
    shifted_bias[1] = fmaf(-2048.f, row_scale, half_to_float(p.y >> 16));
}

template <u32 MASK>
__device__ __forceinline__ float code_as_float(u32 bits) {
    // The code under MASK (bits 16-19 or 12-15) under the bits of float 128.0: the float 128 + q,
    // or 128 + q / 16.
    u32 r;
    asm("lop3.b32 %0, %1, %2, 0x43000000, 0xEA;" : "=r"(r) : "r"(bits), "n"(MASK));
    return __uint_as_float(r);
}

__device__ __forceinline__ void dequantize_word(u32 word, const float scale[2], const float shifted_bias[2],
                                                u32 a[4]) {
    // A fragment's four registers, codes r and r + 4 of the word for register r (rows g for
    // even r, g + 8 for odd: to_fragment_order), as the pairs q * scale + bias in bf16, each
    // an fma in float32 rounded once. Three shifts of the word bring every code to bits 16-19
    // (row g's) or 12-15 (row g + 8's), where one lop3 each makes it a float: eleven integer
    // operations for eight codes, where shifting each code down and splitting bf16 pairs took
    // fifteen. Codes at bits 12-15 shift the bias by 2048 * scale, whose rounding in float32 is
    // at most scale * 2^-13, far under the bf16 rounding of the weight.
    constexpr u32 AT_16 = 0x000F0000u, AT_12 = 0x0000F000u;
    const u32 right8 = word >> 8, left8 = word << 8, rotated = __funnelshift_l(word, word, 16);
    auto pair = [&](float low, float high, int row) {
        return to_bf16_pair(fmaf(low, scale[row], shifted_bias[row]), fmaf(high, scale[row], shifted_bias[row]));
    };
    a[0] = pair(code_as_float<AT_16>(rotated), code_as_float<AT_16>(word), 0);   // codes 0, 4
    a[1] = pair(code_as_float<AT_12>(left8), code_as_float<AT_12>(right8), 1);   // codes 1, 5
    a[2] = pair(code_as_float<AT_16>(left8), code_as_float<AT_16>(right8), 0);   // codes 2, 6
    a[3] = pair(code_as_float<AT_12>(word), code_as_float<AT_12>(rotated), 1);   // codes 3, 7
}

__device__ __forceinline__ void load_b_fragments(u32 b[4], u32 address, bool two_tiles) {
    // The mma's B fragments of two 8-row tiles of x (b[0], b[1]: tile j's inputs 0-7 and 8-15;
    // b[2], b[3]: tile j + 1's) by one `ldmatrix`: lane 8i + r gives the address of row r of
    // matrix i, and receives (row lane / 4, inputs 2 (lane % 4), + 1) of each, which is the
    // fragment. With one tile left, the first two matrices.
    if (two_tiles)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(address));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(b[0]), "=r"(b[1]) : "r"(address));
}

__device__ __forceinline__ void mma(float c[4], const u32 a[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <bool WHOLE, typename Visit>
__device__ __forceinline__ void visit_outputs(float (&acc)[STRIPS][M_TILES][4], int first_strip, int strips, int m0,
                                              int M, int N, int g, int t, Visit visit) {
    // visit(index, value) for each output of the warp's accumulators, index = m * columns + n:
    // c < 2 rows g, else g + 8 of the strip; x rows 2t + (c & 1) of tile j. GATED: row g of a
    // strip is the gate of hidden output 8 strip + g, row g + 8 its value (to_fragment_order),
    // so a lane holds both and visits silu(gate) * value, of N / 2 columns. WHOLE: the warp's
    // rows of x and strips all lie inside the output, so none is skipped and each index is the
    // lane's first plus a constant.
    constexpr int STRIP_OUTPUTS = GATED ? 8 : 16;  // a strip's columns of the output
    const int columns = GATED ? N / 2 : N;
    const int lane_first = (m0 + 2 * t) * columns + first_strip * STRIP_OUTPUTS + g;
    #pragma unroll
    for (int j = 0; j < M_TILES; ++j)
        #pragma unroll
        for (int odd = 0; odd < 2; ++odd) {
            const int row_first = lane_first + (8 * j + odd) * columns;
            #pragma unroll
            for (int s = 0; s < STRIPS; ++s) {
                if (!WHOLE && (m0 + 8 * j + 2 * t + odd >= M || first_strip + s >= strips)) continue;
                if (GATED)
                    visit(row_first + 8 * s, gated_sum(acc[s][j][odd], acc[s][j][2 + odd]));
                else
                    #pragma unroll
                    for (int half = 0; half < 2; ++half) visit(row_first + 16 * s + 8 * half, acc[s][j][2 * half + odd]);
            }
        }
}

template <typename Visit>
__device__ __forceinline__ void for_each_output(float (&acc)[STRIPS][M_TILES][4], int first_strip, int strips, int m0,
                                                int M, int N, int g, int t, Visit visit) {
    // As visit_outputs, the blocks inside the output (all but the last of each side) apart.
    if (m0 + X_ROWS <= M && first_strip + STRIPS <= strips)
        visit_outputs<true>(acc, first_strip, strips, m0, M, N, g, t, visit);
    else
        visit_outputs<false>(acc, first_strip, strips, m0, M, N, g, t, visit);
}

#if MIN_BLOCKS
#define LAUNCH_BOUNDS __launch_bounds__(THREADS, MIN_BLOCKS)  /* registers capped for MIN_BLOCKS blocks an SM */
#else
#define LAUNCH_BOUNDS __launch_bounds__(THREADS)
#endif

#if SPLIT > 1 && CLUSTER_SUMS
#define TILE_COLUMNS (BLOCK_STRIPS * 16)
#define TILE_STRIDE (TILE_COLUMNS + 4)  /* floats a row of a block's sums: lanes g, 2t in different banks */

__device__ __forceinline__ int tile_column(int strip, int half) {
    // Where a block's tile of sums holds rows g (half 0) or g + 8 of a strip: each strip's 16 in
    // order, or GATED every strip's gates (rows g) first, then every strip's values, so that
    // the outputs a warp gates together are read from contiguous columns (no bank conflicts).
    return GATED ? half * (TILE_COLUMNS / 2) + strip * 8 : strip * 16 + half * 8;
}

__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

__device__ __forceinline__ u32 cluster_address(u32 address, int rank) {
    // `address` of this block's shared memory as the same place in block `rank`'s, in the
    // cluster's shared window (each block's memory one contiguous piece of it).
    u32 remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(address), "r"(rank));
    return remote;
}

__device__ __forceinline__ float2 load_from_cluster(u32 remote) {
    float2 v;
    asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(remote) : "memory");
    return v;
}

#define CLUSTER __cluster_dims__(1, 1, SPLIT)
#else
#define CLUSTER
#endif

extern "C" __global__ void LAUNCH_BOUNDS CLUSTER int4_mma(
        const u16* __restrict__ x, const uint4* __restrict__ w, const char* __restrict__ sb, u16* __restrict__ out,
        float* __restrict__ partial_sums, int M, int N, int K, int k_slice) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_n = warp % WARPS_N, warp_k = warp / WARPS_N;
    const int g = lane >> 2, t = lane & 3;
    const int strips = N / 16, strip0 = blockIdx.x * BLOCK_STRIPS, m0 = blockIdx.y * X_ROWS;
    const int k_begin = blockIdx.z * k_slice, iters = k_slice / KC, chunks = K / KC, groups = K / GROUP;
    const u32 smem_base = (u32)__cvta_generic_to_shared(smem);

    // This thread's share of a stage's copies: each piece's place in a stage, and the byte offset
    // of its source, set at the slice's first chunk and moved on a chunk after each copy (stages
    // are loaded in chunk order; offsets carried from chunk to chunk stay in registers, where
    // offsets worked out from rows and strips were worked out again every chunk). Rows of x past
    // M are zeros (a copy of no bytes: reading the last row instead made 1 and 2 rows 10-30 %
    // slower) and strips past N copy the last strip (their products are never written), so no
    // copy needs a predicate or a select.
    const char* const x_bytes = (const char*)x;
    const char* const w_bytes = (const char*)w;
    const int x_row = tid >> 3;
    const u32 x_dst = x_row * X_STRIDE_WORDS * 4 + (tid & 7) * 16;
    u32 x_from[X_COPIES], x_size[X_COPIES], w_from[W_COPIES], sb_from[SB_COPIES];
    #pragma unroll
    for (int p = 0; p < X_COPIES; ++p) {
        const int row = m0 + x_row + p * (THREADS / 8);
        x_from[p] = ((u32)min(row, M - 1) * K + k_begin + (tid & 7) * 8) * 2;
        x_size[p] = row < M ? 16 : 0;
    }
    #pragma unroll
    for (int p = 0; p < W_COPIES; ++p) {
        const int strip = min(strip0 + (tid >> 5) + p * (THREADS / 32), strips - 1);
        w_from[p] = (((u32)strip * chunks + k_begin / KC) * 32 + lane) * 16;
    }
    #pragma unroll
    for (int p = 0; p < SB_COPIES; ++p) {  // a group's scales every chunk, or every other one (GROUP 128)
        const int i = tid + p * THREADS, entry = i >> 2, strip = min(strip0 + entry / SB_ENTRIES, strips - 1);
        sb_from[p] = ((u32)strip * groups + entry % SB_ENTRIES) * 64 + (i & 3) * 16;
    }
    auto load_next_chunk = [&](int slot, int chunk) {  // chunk: index from k_begin
        const u32 stage = smem_base + slot * STAGE_BYTES;
        #pragma unroll
        for (int p = 0; p < X_COPIES; ++p)
            if (X_PIECES % THREADS == 0 || tid + p * THREADS < X_PIECES) {
                copy16(stage + x_dst + p * (THREADS / 8) * X_STRIDE_WORDS * 4, x_bytes + x_from[p], x_size[p]);
                x_from[p] += KC * 2;
            }
        #pragma unroll
        for (int p = 0; p < W_COPIES; ++p)
            if (W_PIECES % THREADS == 0 || tid + p * THREADS < W_PIECES) {
                copy16(stage + X_BYTES + (tid + p * THREADS) * 16, w_bytes + w_from[p]);
                w_from[p] += 512;
            }
        const char* const sb_chunk = sb + (size_t)((k_begin + chunk * KC) / GROUP) * 64;
        #pragma unroll
        for (int p = 0; p < SB_COPIES; ++p)
            if (SB_PIECES % THREADS == 0 || tid + p * THREADS < SB_PIECES)
                copy16(stage + X_BYTES + W_BYTES + (tid + p * THREADS) * 16, sb_chunk + sb_from[p]);
    };

    // Sums over the whole slice (acc). With scales once a group, also sums over the current
    // group (group_acc: the codes' 128 + q times x) and of x over it (x_sum, from a product with
    // an all-ones A); at the end of a group, acc += scale * group_acc + (bias - 128 * scale) *
    // x_sum, which is sum((q * scale + bias) * x) with the scale and bias applied once a group,
    // not a weight. DEQUANTIZE: the weights themselves, in bf16, straight into acc.
    float acc[STRIPS][M_TILES][4];
#if DEQUANTIZE
    float (&products)[STRIPS][M_TILES][4] = acc;
    float scale[STRIPS][2], shifted_bias[STRIPS][2];
#else
    float group_acc[STRIPS][M_TILES][4], x_sum[M_TILES][4];
    float (&products)[STRIPS][M_TILES][4] = group_acc;
    const u32 ones[4] = {0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u};  // bf16 pairs of 1.0
    #pragma unroll
    for (int j = 0; j < M_TILES; ++j)
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
            x_sum[j][c] = 0.f;
            #pragma unroll
            for (int s = 0; s < STRIPS; ++s) group_acc[s][j][c] = 0.f;
        }
#endif
    #pragma unroll
    for (int s = 0; s < STRIPS; ++s)
        #pragma unroll
        for (int j = 0; j < M_TILES; ++j)
            #pragma unroll
            for (int c = 0; c < 4; ++c) acc[s][j][c] = 0.f;

    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < iters) load_next_chunk(s, s);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int it = 0; it < iters; ++it) {
        asm volatile("cp.async.wait_group %0;\n" :: "n"(STAGES - 2));
        __syncthreads();  // chunk `it` is in; every warp is done with the slot refilled next
        if (it + STAGES - 1 < iters) load_next_chunk((it + STAGES - 1) % STAGES, it + STAGES - 1);
        asm volatile("cp.async.commit_group;\n" ::);

        const unsigned char* stage = smem + (it % STAGES) * STAGE_BYTES;
        // This lane's row of the 8x8 matrices `ldmatrix` reads (load_b_fragments).
        const u32 x_fragments = smem_base + (it % STAGES) * STAGE_BYTES
                                + ((lane & 7) + 8 * (lane >> 4)) * X_STRIDE_WORDS * 4 + ((lane >> 3) & 1) * 16;
        const uint4* ws = (const uint4*)(stage + X_BYTES);
        const uint2* sbs = (const uint2*)(stage + X_BYTES + W_BYTES);
        uint4 words[STRIPS];
        #pragma unroll
        for (int s = 0; s < STRIPS; ++s) words[s] = ws[(warp_n * STRIPS + s) * 32 + lane];
        #pragma unroll
        for (int step = 0; step < 4; ++step) {
            const int entry = GROUP < KC ? step * 16 / GROUP : 0;  // this step's group in the stage
            if (step % WARPS_K == warp_k) {
#if DEQUANTIZE
                // this warp's first step of the chunk, or the first of another group
                if (step < WARPS_K || (GROUP < KC && (step - WARPS_K) * 16 / GROUP != entry))
                    #pragma unroll
                    for (int s = 0; s < STRIPS; ++s)
                        load_dequantize_scales(sbs + (warp_n * STRIPS + s) * SB_ENTRIES * 8, entry, g, scale[s], shifted_bias[s]);
#endif
                u32 a[STRIPS][4];
                #pragma unroll
                for (int s = 0; s < STRIPS; ++s) {
                    const u32 word = step == 0 ? words[s].x : step == 1 ? words[s].y : step == 2 ? words[s].z : words[s].w;
                    // Register r of the fragment: codes r and r + 4 of the word (layout:
                    // to_fragment_order), of row g for even r, g + 8 for odd.
#if DEQUANTIZE
                    dequantize_word(word, scale[s], shifted_bias[s], a[s]);
#else
                    #pragma unroll
                    for (int r = 0; r < 4; ++r) a[s][r] = codes_plus_128(word >> (4 * r));
#endif
                }
                #pragma unroll
                for (int j = 0; j < M_TILES; j += 2) {
                    u32 b[4];  // B fragments (inputs 0-7, 8-15 of the step) of tiles j and j + 1
                    load_b_fragments(b, x_fragments + (j * 8 * X_STRIDE_WORDS + step * 8) * 4, j + 1 < M_TILES);
                    #pragma unroll
                    for (int jj = j; jj < j + 2 && jj < M_TILES; ++jj) {
                        const u32 b0 = b[2 * (jj - j)], b1 = b[2 * (jj - j) + 1];
                        #pragma unroll
                        for (int s = 0; s < STRIPS; ++s) mma(products[s][jj], a[s], b0, b1);
#if !DEQUANTIZE
                        mma(x_sum[jj], ones, b0, b1);
#endif
                    }
                }
            }
#if !DEQUANTIZE
            // A group ends after this step: every warp applies its own part of the group's sums.
            // (A slice of K may also end inside a 128-input group: its part is applied there.)
            const bool group_ends = GROUP <= KC ? (step + 1) * 16 % GROUP == 0
                                                : step == 3 && (((k_begin / KC + it) & (GROUP / KC - 1)) == GROUP / KC - 1
                                                                || it == iters - 1);
            if (group_ends) {
                #pragma unroll
                for (int s = 0; s < STRIPS; ++s) {
                    float scale[2], shifted_bias[2];  // rows g (c < 2) and g + 8 (c >= 2) of the strip
                    load_scales(sbs + (warp_n * STRIPS + s) * SB_ENTRIES * 8, entry, g, scale, shifted_bias);
                    #pragma unroll
                    for (int j = 0; j < M_TILES; ++j)
                        #pragma unroll
                        for (int c = 0; c < 4; ++c) {
                            acc[s][j][c] = fmaf(scale[c >> 1], group_acc[s][j][c],
                                                fmaf(shifted_bias[c >> 1], x_sum[j][c & 1], acc[s][j][c]));
                            group_acc[s][j][c] = 0.f;
                        }
                }
                #pragma unroll
                for (int j = 0; j < M_TILES; ++j)
                    #pragma unroll
                    for (int c = 0; c < 4; ++c) x_sum[j][c] = 0.f;
            }
#endif
        }
    }

    if (WARPS_K > 1) {  // sum the warps that shared the steps, through shared memory
        asm volatile("cp.async.wait_group 0;\n" ::);
        __syncthreads();
        float* partial = (float*)smem;
        const int per_warp = STRIPS * M_TILES * 4 * 32;
        if (warp_k > 0) {
            float* mine = partial + ((warp_k - 1) * WARPS_N + warp_n) * per_warp + lane;
            #pragma unroll
            for (int s = 0; s < STRIPS; ++s)
                #pragma unroll
                for (int j = 0; j < M_TILES; ++j)
                    #pragma unroll
                    for (int c = 0; c < 4; ++c) mine[((s * M_TILES + j) * 4 + c) * 32] = acc[s][j][c];
        }
        __syncthreads();
        if (warp_k == 0) {
            for (int other = 0; other < WARPS_K - 1; ++other) {
                const float* theirs = partial + (other * WARPS_N + warp_n) * per_warp + lane;
                #pragma unroll
                for (int s = 0; s < STRIPS; ++s)
                    #pragma unroll
                    for (int j = 0; j < M_TILES; ++j)
                        #pragma unroll
                        for (int c = 0; c < 4; ++c) acc[s][j][c] += theirs[((s * M_TILES + j) * 4 + c) * 32];
            }
        }
    }

#if SPLIT > 1 && CLUSTER_SUMS
    // The SPLIT blocks of a tile, one a slice of K, are one cluster: each puts its partial sums
    // in its own shared memory, then adds up every block's sums over its share of the tile's
    // columns (distributed shared memory) and writes them.
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();  // every warp is done with the pipeline's shared memory
    if (warp_k == 0) {  // every sum into the block's tile; rows past M, strips past N are never read
        float* const lane_sums = (float*)smem + 2 * t * TILE_STRIDE + g;
        #pragma unroll
        for (int s = 0; s < STRIPS; ++s)
            #pragma unroll
            for (int j = 0; j < M_TILES; ++j)
                #pragma unroll
                for (int c = 0; c < 4; ++c)
                    lane_sums[(8 * j + (c & 1)) * TILE_STRIDE + tile_column(warp_n * STRIPS + s, c >> 1)] = acc[s][j][c];
    }
    u32 block_sums[SPLIT];  // the tiles of the cluster's blocks
    #pragma unroll
    for (int rank = 0; rank < SPLIT; ++rank) block_sums[rank] = cluster_address(smem_base, rank);
    cluster_sync();  // every block's sums are in place
    // Each block adds up and writes its share of the tile's outputs, taken two at a time: two
    // columns of the tile, or GATED two hidden outputs, their gates two columns of the tile's
    // first half and their values the same two of its second (tile_column).
    constexpr int PAIRS = GATED ? TILE_COLUMNS / 4 : TILE_COLUMNS / 2;  // pairs of outputs a row of the tile
    const int rows = min(X_ROWS, M - m0), items = rows * PAIRS, per_block = CEIL(items, SPLIT);
    const int last = min(items, ((int)blockIdx.z + 1) * per_block);
    for (int i = blockIdx.z * per_block + tid; i < last; i += THREADS) {
        const int m = i / PAIRS, pair = i % PAIRS;
        const int column = 2 * pair;  // GATED: the gates' column, also the block's hidden output index
        if (GATED ? strip0 * 8 + column >= N / 2 : strip0 * 16 + column >= N) continue;  // the last tile's strips past N
        const u32 offset = (m * TILE_STRIDE + column) * 4;
        float2 sum = {0.f, 0.f}, value = {0.f, 0.f};
        #pragma unroll
        for (int rank = 0; rank < SPLIT; ++rank) {
            const float2 theirs = load_from_cluster(block_sums[rank] + offset);
            sum.x += theirs.x;
            sum.y += theirs.y;
            if (GATED) {
                const float2 their_values = load_from_cluster(block_sums[rank] + offset + TILE_COLUMNS / 2 * 4);
                value.x += their_values.x;
                value.y += their_values.y;
            }
        }
        if (GATED)
            *(u32*)(out + (size_t)(m0 + m) * (N / 2) + strip0 * 8 + column) =
                to_bf16_pair(gated_sum(sum.x, value.x), gated_sum(sum.y, value.y));
        else
            *(u32*)(out + (size_t)(m0 + m) * N + strip0 * 16 + column) = to_bf16_pair(sum.x, sum.y);
    }
    cluster_sync();  // no block leaves while another reads its shared memory
#else
    if (warp_k == 0) for_each_output(acc, strip0 + warp_n * STRIPS, strips, m0, M, N, g, t, [&](int index, float v) {
#if SPLIT > 1
#if GATED
#error "a gated product adds up a split K in the cluster (the gate needs whole sums)"
#endif
        atomicAdd(partial_sums + index, v);
#else
        out[index] = to_bf16(v);
#endif
    });
#endif
}
"""


def kernel_source(m_tiles: int, config: MmaConfig, group_size: int, gated: bool = False) -> str:
    """The kernel's CUDA C for one shape of launch (its constants as #defines); `gated`: the
    layer's halves interleaved (`to_fragment_order`), silu(a) * b written."""
    constants = dict(M_TILES=m_tiles, WARPS_N=config.warps_n, WARPS_K=config.warps_k, STRIPS=config.strips,
                     STAGES=config.stages, GROUP=group_size, SPLIT=config.split_k,
                     DEQUANTIZE=int(config.dequantize), MIN_BLOCKS=config.min_blocks,
                     CLUSTER_SUMS=int(config.cluster_sums), GATED=int(gated))
    return "".join(f"#define {name} {value}\n" for name, value in constants.items()) + _SOURCE


def shared_bytes(m_tiles: int, config: MmaConfig, group_size: int) -> int:
    """Dynamic shared memory of a launch: the pipeline's stages, the warps' partial sums, or
    with sums added up in a cluster the block's tile of them (rows of x by the block's columns,
    4 floats of padding)."""
    block_strips = config.warps_n * config.strips
    stage = m_tiles * 8 * 36 * 4 + block_strips * 512 + block_strips * max(1, CHUNK_INPUTS // group_size) * 64
    partial = (config.warps_k - 1) * block_strips * m_tiles * 4 * 32 * 4
    tile = m_tiles * 8 * (block_strips * STRIP_ROWS + 4) * 4 if config.split_k > 1 and config.cluster_sums else 0
    return max(config.stages * stage, partial, tile)


def nvrtc_compile(source: str, name: str, arch: str, library: ctypes.CDLL) -> bytes:
    """CUDA C -> a cubin for `arch` (e.g. "sm_90") through NVRTC. No headers, so no CUDA
    toolkit is needed beyond the NVRTC library that PyTorch's CUDA builds ship with."""
    program = ctypes.c_void_p()
    _nvrtc_check(library, library.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(),
                                                     0, None, None))
    options = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--use_fast_math"]
    try:
        status = library.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        if status != 0:
            size = ctypes.c_size_t()
            library.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            library.nvrtcGetProgramLog(program, log)
            raise RuntimeError(f"NVRTC could not compile {name}:\n{log.value.decode()}")
        size = ctypes.c_size_t()
        _nvrtc_check(library, library.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _nvrtc_check(library, library.nvrtcGetCUBIN(program, cubin))
        return cubin.raw
    finally:
        library.nvrtcDestroyProgram(ctypes.byref(program))


def _nvrtc_check(library: ctypes.CDLL, status: int) -> None:
    if status != 0:
        library.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC: {library.nvrtcGetErrorString(status).decode()}")


@functools.cache
def kernel_cubin(m_tiles: int, config: MmaConfig, group_size: int, arch: str, gated: bool = False) -> bytes:
    """The kernel compiled for one launch shape and GPU architecture (once a process)."""
    from torch.cuda import _utils as cuda_utils  # PyTorch's loader of the NVRTC library

    return nvrtc_compile(kernel_source(m_tiles, config, group_size, gated), "int4_mma", arch,
                         cuda_utils._get_nvrtc_library())


def x_tiles(rows: int) -> int:
    """The mma tiles of x rows (8 rows each) a block takes for `rows` rows of x, up to
    MAX_TILE_ROWS: with the launch shape, what one compiled kernel serves."""
    return min(MAX_TILE_ROWS, rows + 7 & ~7) // 8


@functools.cache
def _kernel(device: int, m_tiles: int, config: MmaConfig, group_size: int, gated: bool):
    """The kernel loaded on one device, ready to launch."""
    from torch.cuda import _utils as cuda_utils  # PyTorch's loader of CUDA modules and launcher

    major, minor = _capability(device)
    cubin = kernel_cubin(m_tiles, config, group_size, f"sm_{major}{minor}", gated)
    with torch.cuda.device(device):
        kernel = cuda_utils._cuda_load_module(cubin, ["int4_mma"])["int4_mma"]
        kernel.set_shared_memory_config(shared_bytes(m_tiles, config, group_size))
    return kernel


# The fastest launch shape per (rows bucket, N, K) of the LM's int4 layers, from the sweeps of
# bench/int4_mma.py on an H200 (rows buckets 2, 8, 32, 64; values: MmaConfig's fields in order):
# the temporal layers' (run AD, bench/results/h200-int4-mma.json), then the depformer's (run AE,
# h200-int4-mma-depformer.json).
_TUNED_H200: dict[tuple[int, int, int], tuple[int, int, int, int, int, bool, int, bool]] = {
    (2, 12288, 4096): (4, 1, 2, 4, 8, False, 0, True),
    (8, 12288, 4096): (4, 1, 2, 4, 8, False, 0, True),
    (32, 12288, 4096): (4, 1, 1, 4, 2, True, 2, True),
    (64, 12288, 4096): (4, 1, 2, 4, 4, True, 0, False),
    (2, 4096, 4096): (4, 1, 1, 4, 8, False, 0, True),
    (8, 4096, 4096): (4, 1, 1, 4, 8, False, 0, True),
    (32, 4096, 4096): (8, 1, 1, 4, 8, True, 2, False),
    (64, 4096, 4096): (8, 1, 1, 4, 8, True, 2, False),
    (2, 22528, 4096): (4, 1, 2, 4, 4, False, 0, True),
    (8, 22528, 4096): (4, 1, 2, 4, 4, False, 0, True),
    (32, 22528, 4096): (4, 1, 4, 4, 4, True, 0, True),
    (64, 22528, 4096): (4, 1, 2, 4, 4, True, 4, True),
    (2, 4096, 11264): (2, 1, 2, 4, 8, False, 0, False),
    (8, 4096, 11264): (2, 1, 2, 4, 8, False, 0, False),
    (32, 4096, 11264): (4, 1, 2, 4, 8, True, 2, False),
    (64, 4096, 11264): (4, 1, 2, 4, 8, True, 0, False),
    (2, 1024, 4096): (1, 4, 2, 4, 8, False, 0, True),
    (8, 1024, 4096): (4, 1, 1, 4, 8, False, 0, True),
    (32, 1024, 4096): (4, 1, 1, 4, 8, True, 2, True),
    (64, 1024, 4096): (4, 1, 1, 4, 8, True, 2, False),
    (2, 3072, 1024): (4, 1, 2, 4, 8, False, 0, True),
    (8, 3072, 1024): (4, 1, 1, 4, 4, False, 0, True),
    (32, 3072, 1024): (4, 1, 1, 4, 4, True, 2, True),
    (64, 3072, 1024): (8, 1, 1, 4, 4, True, 2, True),
    (2, 1024, 1024): (4, 1, 1, 4, 8, False, 0, True),
    (8, 1024, 1024): (2, 1, 2, 4, 8, False, 0, True),
    (32, 1024, 1024): (4, 1, 1, 4, 4, True, 2, True),
    (64, 1024, 1024): (4, 1, 1, 4, 4, True, 2, True),
    (2, 5632, 1024): (2, 1, 2, 4, 8, False, 0, True),
    (8, 5632, 1024): (4, 1, 2, 4, 8, False, 0, True),
    (32, 5632, 1024): (4, 1, 1, 4, 4, True, 2, True),
    (64, 5632, 1024): (4, 1, 1, 4, 4, True, 2, True),
    (2, 1024, 2816): (2, 2, 1, 4, 4, False, 0, True),
    (8, 1024, 2816): (2, 2, 1, 4, 4, False, 0, True),
    (32, 1024, 2816): (4, 1, 1, 4, 4, True, 2, True),
    (64, 1024, 2816): (4, 1, 1, 4, 4, True, 2, True),
}
# Rows of x from which weights are dequantized in registers: the table's 32-row bucket (swept at
# 32 and 64 rows, where it won; at 8 rows a weight so dequantized serves too few products).
DEQUANTIZE_FROM_ROWS = 9


def default_config(m: int, n: int, k: int) -> MmaConfig:
    """The launch shape measured fastest for this product (`_TUNED_H200`), else the one the
    sweeps chose most: four warps of two strips (128 rows of the weights a block) and K split,
    so that short-lived blocks fill every SM; weights dequantized in registers from
    DEQUANTIZE_FROM_ROWS rows of x, the split's sums added up in a cluster up to 8."""
    bucket = next((b for b in (2, 8, 32) if m <= b), 64)
    tuned = _TUNED_H200.get((bucket, n, k))
    if tuned is not None:
        return MmaConfig(*tuned)
    return MmaConfig(warps_n=4, warps_k=1, strips=2, stages=4, split_k=8 if m <= 8 else 4,
                     dequantize=m >= DEQUANTIZE_FROM_ROWS, cluster_sums=m <= 8)


def fit_split_k(config: MmaConfig, k: int) -> MmaConfig:
    """The launch shape with K's split halved until each slice is whole chunks of K."""
    split_k = config.split_k
    while split_k > 1 and k % (split_k * CHUNK_INPUTS):
        split_k //= 2
    return replace(config, split_k=split_k)


@functools.cache
def _capability(device: int) -> tuple[int, int]:
    """A GPU's compute capability, asked once (every launch needs it)."""
    return torch.cuda.get_device_capability(device)


def for_capability(config: MmaConfig, capability: tuple[int, int]) -> MmaConfig:
    """The launch shape as a GPU of this compute capability can take it: sums added up in a
    cluster need Hopper's thread-block clusters (9.0); before, atomic adds."""
    return config if capability >= (9, 0) else replace(config, cluster_sums=False)


def available(device: torch.device) -> bool:
    """Whether this kernel can run on `device`: a CUDA GPU with bf16 tensor cores (compute
    capability 8.0 or newer) for which NVRTC compiles it (the library present, the GPU one it
    knows). Tried once a device; where it cannot, the int4 layers stay with the Triton kernels."""
    return device.type == "cuda" and _compiles_for(device_index(device))


@functools.cache
def _compiles_for(device: int) -> bool:
    major, minor = _capability(device)
    if major < 8:
        return False
    try:
        probe = for_capability(default_config(1, STRIP_ROWS, CHUNK_INPUTS), (major, minor))
        kernel_cubin(x_tiles(1), probe, 64, f"sm_{major}{minor}")
    except (OSError, RuntimeError) as exc:  # no NVRTC library, or a GPU it cannot compile for
        warnings.warn(f"the int4 tensor-core kernel cannot be compiled here ({exc}); int4 stays on the Triton kernels",
                      stacklevel=3)
        return False
    return True


def launch_config(m: int, n: int, k: int, capability: tuple[int, int], config: MmaConfig | None = None,
                  gated: bool = False) -> MmaConfig:
    """The launch shape `int4_mma_linear` takes: `config`, by default the table's
    (`default_config`), with K's split fitted (`fit_split_k`) and as the GPU can take it
    (`for_capability`). Gated, a split K is added up in the cluster, where the gate sees whole
    sums, or without clusters not split."""
    config = fit_split_k(config or default_config(m, n, k), k)
    if gated and config.split_k > 1:
        config = replace(config, cluster_sums=True)
    config = for_capability(config, capability)
    if gated and config.split_k > 1 and not config.cluster_sums:
        config = replace(config, split_k=1)
    return config


def sums_in_float32(config: MmaConfig) -> bool:
    """Whether a launch adds up its split K by atomic adds into a zeroed float32 buffer. Then
    `int4_mma_linear` returns those float32 sums as they are and the caller casts them: in a
    compiled frame the next kernel does it, where a cast of its own was one more kernel per
    product (104 of a 64-row int4 frame, 0.17 ms; docs/PERFORMANCE.md, run AI)."""
    return config.split_k > 1 and not config.cluster_sums


def output_dtype(m: int, n: int, k: int, device: int, dtype: torch.dtype, gated: bool = False) -> torch.dtype:
    """The dtype `int4_mma_linear` returns for x [m, k] of `dtype` and N outputs, at its default
    launch shape: float32 where K's split is added up by atomic adds, else x's."""
    return torch.float32 if sums_in_float32(launch_config(m, n, k, _capability(device), gated=gated)) else dtype


def int4_mma_linear(x: torch.Tensor, words: torch.Tensor, scale_bias: torch.Tensor, group_size: int,
                    config: MmaConfig | None = None, gated: bool = False) -> torch.Tensor:
    """x [M, K] @ dequant(W).T -> [M, N], W in fragment order (`to_fragment_order`): in x's
    dtype, or float32 sums where K's split is added up by atomic adds (`sums_in_float32`: the
    caller casts them). `gated`: W's two halves a, b interleaved (`to_fragment_order(...,
    gated=True)`), and silu(a) * b written, [M, N / 2] in x's dtype."""
    m, k = x.shape
    n = words.shape[0]
    device = device_index(x.device)
    config = launch_config(m, n, k, _capability(device), config, gated)
    out_dtype = torch.float32 if sums_in_float32(config) else x.dtype
    outputs = n // 2 if gated else n
    if m == 0:
        return x.new_empty((0, outputs), dtype=out_dtype)
    most_rows = MAX_INDEX // max(n, 2 * k)
    if m > most_rows:  # more rows than the kernel's 32-bit indices of x and the output reach
        # Every part at this launch shape, so every part in out_dtype.
        return torch.cat([int4_mma_linear(part, words, scale_bias, group_size, config, gated)
                          for part in x.split(most_rows)])
    m_tiles = x_tiles(m)
    kernel = _kernel(device, m_tiles, config, group_size, gated)
    x16 = x.to(torch.bfloat16).contiguous()
    # The kernel writes bf16 `out`, or with atomic sums the float32 `partial_sums`: it takes
    # both pointers and writes only the one its code uses.
    if sums_in_float32(config):
        out = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((m, outputs), device=x.device, dtype=torch.bfloat16)
    block_strips = config.warps_n * config.strips
    grid = (math.ceil(n // STRIP_ROWS / block_strips), math.ceil(m / (m_tiles * 8)), config.split_k)  # z: K's slices
    with torch.cuda.device(x.device):  # the launch goes to the current device's current stream
        kernel(grid=grid, block=(config.warps_n * config.warps_k * 32, 1, 1),
               args=[x16, words, scale_bias, out, out, m, n, k, k // config.split_k],
               shared_mem=shared_bytes(m_tiles, config, group_size))
    return out if out.dtype == out_dtype else out.to(out_dtype)
