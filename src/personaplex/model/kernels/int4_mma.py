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
  multiply the chunk that has arrived.
- **Codes to bf16 by bit operations**: each code lands in bits 16-19 under 128.0's bits (one
  `lop3`), and (128 + q) * scale + (bias - 128 * scale) is q * scale + bias in one float FMA,
  rounded once to bf16: the dequantized weight the readable path multiplies, as the Triton
  kernels compute it.

Warps split a block's 16-row strips (WARPS_N) and each 64-input chunk's four 16-input steps
(WARPS_K, summed in shared memory at the end); blocks split N, then 64-row chunks of x, then K
(`split_k`: partial sums meet in a zeroed float32 buffer through atomic adds, then are cast;
a last-block-adds-up variant with no extra kernels measured slower, docs/QUANTIZATION.md).
Needs a GPU of
compute capability 8.0 or newer (bf16 `mma.sync`), N a multiple of 16 and K of 64.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass, replace

import torch

CHUNK_INPUTS = 64  # inputs a pipeline stage brings in (4 steps of the mma's 16)
STRIP_ROWS = 16  # output rows of one A fragment
MAX_TILE_ROWS = 64  # rows of x a block takes (8 mma tiles of 8); more rows take more blocks


@dataclass(frozen=True)
class MmaConfig:
    warps_n: int = 4  # warps side by side over the block's strips
    warps_k: int = 1  # warps sharing each chunk's four 16-input steps
    strips: int = 1  # 16-row strips each warp multiplies
    stages: int = 4  # chunks in flight
    split_k: int = 1  # blocks sharing K


def fits(out_features: int, in_features: int) -> bool:
    """Whether a layer's shape can take fragment order."""
    return out_features % STRIP_ROWS == 0 and in_features % CHUNK_INPUTS == 0


# --------------------------------------------------------------------------- layout


def to_fragment_order(codes: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 codes uint8 [N, K] (one code a byte) and fp16 scales, biases [N, K/G] -> the
    kernel's operands: words int32 [N, K/8] and scale_bias fp16 [N, 2K/G], which are, in memory:

    - words [N/16 strips][K/64 chunks][32 lanes][4 steps]: lane 4g + t's word of step s holds
      its A fragment of rows 16 strip + (g, g + 8), inputs 64 chunk + 16 s + (2t, 2t + 1,
      2t + 8, 2t + 9): register j of the fragment (j = row half + 2 * input half) takes codes
      j (first input) and j + 4 (second) of the word, code i in bits 4i .. 4i + 3;
    - scale_bias [N/16][K/G][8][4]: for lanes 4g + t, (scale, bias) of row g then of row g + 8.
    """
    n, k = codes.shape
    if not fits(n, k):
        raise ValueError(f"fragment order needs N % {STRIP_ROWS} == 0 and K % {CHUNK_INPUTS} == 0, got {n} x {k}")
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


def from_fragment_order(words: torch.Tensor, scale_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `to_fragment_order`: -> codes uint8 [N, K], scales and biases fp16 [N, K/G]."""
    n, k = words.shape[0], words.shape[1] * 8
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    nibbles = (words.reshape(n // 16, k // 64, 8, 4, 4, 1) >> shifts) & 0xF  # strip, chunk, g, t, step, code
    q = nibbles.reshape(n // 16, k // 64, 8, 4, 4, 2, 2, 2)  # ..., p, e, h
    codes = q.permute(0, 7, 2, 1, 4, 6, 3, 5).reshape(n, k)  # strip, h, g, chunk, step, e, t, p
    groups = scale_bias.shape[1] // 2
    pairs = scale_bias.reshape(n // 16, groups, 8, 2, 2).permute(0, 3, 2, 1, 4)  # strip, h, g, group, (s, b)
    pairs = pairs.reshape(n, groups, 2)
    return codes.to(torch.uint8), pairs[..., 0].contiguous(), pairs[..., 1].contiguous()


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

__device__ __forceinline__ void copy16(u32 dst, const void* src, bool valid) {
    // Asynchronous 16-byte copy to shared memory; zeros where !valid.
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ float half_to_float(u32 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)h));
    return f;
}

__device__ __forceinline__ float code_plus_128(u32 bits) {
    // The code in bits 16-19 of `bits`, under the bits of 128.0: the float 128 + q.
    u32 r;
    asm("lop3.b32 %0, %1, 0xF0000, 0x43000000, 0xEA;" : "=r"(r) : "r"(bits));
    return __uint_as_float(r);
}

__device__ __forceinline__ u32 bf16_pair(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ void dequantize(u32 w, float s0, float b0, float s1, float b1, u32 a[4]) {
    // Register j: codes j and j + 4; rows g (j even, scale s0) or g + 8 (j odd, s1).
    a[0] = bf16_pair(fmaf(code_plus_128(w << 16), s0, b0), fmaf(code_plus_128(w), s0, b0));
    a[1] = bf16_pair(fmaf(code_plus_128(w << 12), s1, b1), fmaf(code_plus_128(w >> 4), s1, b1));
    a[2] = bf16_pair(fmaf(code_plus_128(w << 8), s0, b0), fmaf(code_plus_128(w >> 8), s0, b0));
    a[3] = bf16_pair(fmaf(code_plus_128(w << 4), s1, b1), fmaf(code_plus_128(w >> 12), s1, b1));
}

__device__ __forceinline__ void mma(float c[4], const u32 a[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void load_stage(u32 stage, const u16* x, const uint4* w, const char* sb,
                                           int M, int K, int m0, int strip0, int strips, int k0, int tid) {
    for (int i = tid; i < X_ROWS * 8; i += THREADS) {  // x: rows of 8 pieces of 16 bytes
        int row = i >> 3, piece = i & 7, m = m0 + row;
        bool ok = m < M;
        copy16(stage + row * X_STRIDE_WORDS * 4 + piece * 16, x + (size_t)(ok ? m : 0) * K + k0 + piece * 8, ok);
    }
    u32 w_stage = stage + X_BYTES;
    int chunks = K / KC;
    for (int i = tid; i < BLOCK_STRIPS * 32; i += THREADS) {  // weights: 16 bytes a lane a strip
        int strip = strip0 + (i >> 5);
        bool ok = strip < strips;
        copy16(w_stage + i * 16, w + ((size_t)(ok ? strip : 0) * chunks + k0 / KC) * 32 + (i & 31), ok);
    }
    u32 sb_stage = w_stage + W_BYTES;
    int groups = K / GROUP;
    for (int i = tid; i < BLOCK_STRIPS * SB_ENTRIES * 4; i += THREADS) {  // 64 bytes a strip a group
        int entry = i >> 2, strip = strip0 + entry / SB_ENTRIES;
        bool ok = strip < strips;
        size_t group = (size_t)(ok ? strip : 0) * groups + k0 / GROUP + entry % SB_ENTRIES;
        copy16(sb_stage + i * 16, sb + group * 64 + (i & 3) * 16, ok);
    }
}

__device__ __forceinline__ u16 to_bf16(float v) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

template <typename Visit>
__device__ __forceinline__ void for_each_output(float (&acc)[STRIPS][M_TILES][4], int first_strip, int strips, int m0,
                                                int M, int g, int t, Visit visit) {
    // The output (m, n) of each accumulator: c < 2 rows g, else g + 8 of the strip; x rows
    // 2t + (c & 1) of tile j.
    #pragma unroll
    for (int s = 0; s < STRIPS; ++s) {
        int strip = first_strip + s;
        if (strip >= strips) continue;
        #pragma unroll
        for (int j = 0; j < M_TILES; ++j)
            #pragma unroll
            for (int c = 0; c < 4; ++c) {
                int m = m0 + 8 * j + 2 * t + (c & 1);
                if (m < M) visit(m, strip * 16 + g + (c >> 1) * 8, acc[s][j][c]);
            }
    }
}

extern "C" __global__ void __launch_bounds__(THREADS) int4_mma(
        const u16* __restrict__ x, const uint4* __restrict__ w, const char* __restrict__ sb, u16* __restrict__ out,
        float* __restrict__ partial_sums, int M, int N, int K, int k_slice) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_n = warp % WARPS_N, warp_k = warp / WARPS_N;
    const int g = lane >> 2, t = lane & 3;
    const int strips = N / 16, strip0 = blockIdx.x * BLOCK_STRIPS, m0 = blockIdx.y * X_ROWS;
    const int k_begin = blockIdx.z * k_slice, iters = k_slice / KC;
    const u32 smem_base = (u32)__cvta_generic_to_shared(smem);

    float acc[STRIPS][M_TILES][4];
    #pragma unroll
    for (int s = 0; s < STRIPS; ++s)
        #pragma unroll
        for (int j = 0; j < M_TILES; ++j)
            #pragma unroll
            for (int c = 0; c < 4; ++c) acc[s][j][c] = 0.f;

    #pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < iters) load_stage(smem_base + s * STAGE_BYTES, x, w, sb, M, K, m0, strip0, strips, k_begin + s * KC, tid);
        asm volatile("cp.async.commit_group;\n" ::);
    }
    for (int it = 0; it < iters; ++it) {
        asm volatile("cp.async.wait_group %0;\n" :: "n"(STAGES - 2));
        __syncthreads();  // chunk `it` is in; every warp is done with the slot refilled next
        int next = it + STAGES - 1;
        if (next < iters)
            load_stage(smem_base + (next % STAGES) * STAGE_BYTES, x, w, sb, M, K, m0, strip0, strips, k_begin + next * KC, tid);
        asm volatile("cp.async.commit_group;\n" ::);

        const unsigned char* stage = smem + (it % STAGES) * STAGE_BYTES;
        const u32* xs = (const u32*)stage;
        const uint4* ws = (const uint4*)(stage + X_BYTES);
        const uint2* sbs = (const uint2*)(stage + X_BYTES + W_BYTES);
        uint4 words[STRIPS];
        #pragma unroll
        for (int s = 0; s < STRIPS; ++s) words[s] = ws[(warp_n * STRIPS + s) * 32 + lane];
        #pragma unroll
        for (int step = 0; step < 4; ++step) {
            if (step % WARPS_K != warp_k) continue;
            const int entry = GROUP < KC ? step * 16 / GROUP : 0;
            u32 a[STRIPS][4];
            #pragma unroll
            for (int s = 0; s < STRIPS; ++s) {
                uint2 p = sbs[((warp_n * STRIPS + s) * SB_ENTRIES + entry) * 8 + g];
                float s0 = half_to_float(p.x & 0xFFFF), s1 = half_to_float(p.y & 0xFFFF);
                float b0 = fmaf(-128.f, s0, half_to_float(p.x >> 16)), b1 = fmaf(-128.f, s1, half_to_float(p.y >> 16));
                u32 word = step == 0 ? words[s].x : step == 1 ? words[s].y : step == 2 ? words[s].z : words[s].w;
                dequantize(word, s0, b0, s1, b1, a[s]);
            }
            #pragma unroll
            for (int j = 0; j < M_TILES; ++j) {
                const u32* row = xs + (8 * j + g) * X_STRIDE_WORDS + step * 8 + t;
                u32 b0 = row[0], b1 = row[4];
                #pragma unroll
                for (int s = 0; s < STRIPS; ++s) mma(acc[s][j], a[s], b0, b1);
            }
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

    if (warp_k == 0) for_each_output(acc, strip0 + warp_n * STRIPS, strips, m0, M, g, t, [&](int m, int n, float v) {
#if SPLIT
        atomicAdd(partial_sums + (size_t)m * N + n, v);
#else
        out[(size_t)m * N + n] = to_bf16(v);
#endif
    });
}
"""


def kernel_source(m_tiles: int, config: MmaConfig, group_size: int) -> str:
    """The kernel's CUDA C for one shape of launch (its constants as #defines)."""
    constants = dict(M_TILES=m_tiles, WARPS_N=config.warps_n, WARPS_K=config.warps_k, STRIPS=config.strips,
                     STAGES=config.stages, GROUP=group_size, SPLIT=int(config.split_k > 1))
    return "".join(f"#define {name} {value}\n" for name, value in constants.items()) + _SOURCE


def shared_bytes(m_tiles: int, config: MmaConfig, group_size: int) -> int:
    """Dynamic shared memory of a launch: the pipeline's stages, or the warps' partial sums."""
    block_strips = config.warps_n * config.strips
    stage = m_tiles * 8 * 36 * 4 + block_strips * 512 + block_strips * max(1, CHUNK_INPUTS // group_size) * 64
    partial = (config.warps_k - 1) * block_strips * m_tiles * 4 * 32 * 4
    return max(config.stages * stage, partial)


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
def kernel_cubin(m_tiles: int, config: MmaConfig, group_size: int, arch: str) -> bytes:
    """The kernel compiled for one launch shape and GPU architecture (once a process)."""
    from torch.cuda import _utils as cuda_utils  # PyTorch's loader of the NVRTC library

    return nvrtc_compile(kernel_source(m_tiles, config, group_size), "int4_mma", arch, cuda_utils._get_nvrtc_library())


@functools.cache
def _kernel(device: int, m_tiles: int, config: MmaConfig, group_size: int):
    """The kernel loaded on one device, ready to launch."""
    from torch.cuda import _utils as cuda_utils  # PyTorch's loader of CUDA modules and launcher

    major, minor = torch.cuda.get_device_capability(device)
    code = replace(config, split_k=min(config.split_k, 2))  # the code depends only on whether K is split
    cubin = kernel_cubin(m_tiles, code, group_size, f"sm_{major}{minor}")
    with torch.cuda.device(device):
        kernel = cuda_utils._cuda_load_module(cubin, ["int4_mma"])["int4_mma"]
        kernel.set_shared_memory_config(shared_bytes(m_tiles, config, group_size))
    return kernel


# The fastest launch shape per (rows bucket, N, K) of the temporal layers, from the sweep of
# bench/int4_mma.py on an H200 (bench/results/h200-int4-mma.json; values: warps_n, warps_k,
# strips, stages, split_k).
_TUNED_H200: dict[tuple[int, int, int], tuple[int, int, int, int, int]] = {
    (8, 12288, 4096): (4, 1, 2, 4, 8),
    (32, 12288, 4096): (4, 1, 2, 4, 4),
    (64, 12288, 4096): (4, 1, 2, 4, 4),
    (8, 4096, 4096): (8, 1, 1, 4, 8),
    (32, 4096, 4096): (4, 1, 2, 4, 8),
    (64, 4096, 4096): (4, 1, 2, 4, 8),
    (8, 22528, 4096): (4, 1, 2, 4, 8),
    (32, 22528, 4096): (4, 1, 2, 4, 8),
    (64, 22528, 4096): (4, 1, 2, 4, 2),
    (8, 4096, 11264): (8, 1, 1, 4, 8),
    (32, 4096, 11264): (4, 1, 2, 4, 8),
    (64, 4096, 11264): (4, 1, 2, 4, 8),
}


def default_config(m: int, n: int, k: int) -> MmaConfig:
    """The launch shape measured fastest for this product (`_TUNED_H200`), else the one the
    sweep chose most: 4 warps of two strips (128 rows a block), K split 8 ways (4 for wide
    layers at more than 8 rows) so that short-lived blocks fill every SM."""
    bucket = next(b for b in (8, 32, 64) if m <= b) if m <= 64 else 64
    tuned = _TUNED_H200.get((bucket, n, k))
    if tuned is not None:
        return MmaConfig(*tuned)
    return MmaConfig(warps_n=4, warps_k=1, strips=2, stages=4, split_k=4 if n >= 12288 and m > 8 else 8)


def available(device: torch.device) -> bool:
    """Whether this kernel can run on `device`: a CUDA GPU with bf16 tensor cores (compute
    capability 8.0 or newer) and the NVRTC library that compiles it."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    from torch.cuda import _utils as cuda_utils

    try:
        cuda_utils._get_nvrtc_library()
    except OSError:
        return False
    return True


def int4_mma_linear(x: torch.Tensor, words: torch.Tensor, scale_bias: torch.Tensor, group_size: int,
                    config: MmaConfig | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(W).T -> [M, N] in x's dtype, W in fragment order (`to_fragment_order`)."""
    m, k = x.shape
    n = words.shape[0]
    config = config or default_config(m, n, k)
    split_k = config.split_k
    while split_k > 1 and k % (split_k * CHUNK_INPUTS):
        split_k //= 2
    m_tiles = min(MAX_TILE_ROWS, m + 7 & ~7) // 8
    kernel = _kernel(x.device.index if x.device.index is not None else torch.cuda.current_device(), m_tiles,
                     MmaConfig(config.warps_n, config.warps_k, config.strips, config.stages, split_k), group_size)
    x16 = x.to(torch.bfloat16).contiguous()
    out = torch.empty((m, n), device=x.device, dtype=torch.bfloat16)
    # With K split, the blocks' atomic float32 sums; without, unused (any tensor will do).
    partial_sums = torch.zeros((m, n), device=x.device, dtype=torch.float32) if split_k > 1 else out
    block_strips = config.warps_n * config.strips
    grid = (math.ceil(n // STRIP_ROWS / block_strips), math.ceil(m / (m_tiles * 8)), split_k)
    kernel(grid=grid, block=(config.warps_n * config.warps_k * 32, 1, 1),
           args=[x16, words, scale_bias, out, partial_sums, m, n, k, k // split_k],
           shared_mem=shared_bytes(m_tiles, config, group_size))
    if split_k > 1:
        out = partial_sums
    return out if out.dtype == x.dtype else out.to(x.dtype)
