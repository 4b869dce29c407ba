"""Top-k sampling of one token per row in one launch: the threshold, the noise and the draw.

The readable sampler (`runtime/sampling.py`) scales a row's logits by its temperature, keeps
the candidates at or above the k-th largest scaled logit (found by sorting the row), adds
Gumbel noise to those and takes the argmax. Compiled, that was ~4 kernels a token, plus a
sort or a search for the k-th value: a frame samples nine tokens (one text, eight audio), and
on an H200 a one-row frame spent ~0.2 ms there (bench/results/h200-frame-kernels-runR-*.tsv:
the text token alone ~85 us over 14 kernels). Here one program per row does it all in
registers:

- The k-th largest, without sorting. A float's bit pattern, read as a signed integer with
  the magnitude bits of negative numbers flipped (a "key"), orders as the float does, so the
  k-th largest key is built from the top bit down, keeping each bit where at least k keys are
  at or above the prefix with that bit set. The search runs over the logits as stored: a
  bf16 row takes 16 steps, not the 32 of its float32 scaled values. Scaling by 1 / T is
  monotone, so the k-th largest scaled logit is the scaled value of the k-th largest logit:
  the same threshold the sort finds (ties at it are all kept, as there).
- The noise: a per-row key (splitmix64 of the row's seed and draw counter, computed by the
  caller) hashed with each candidate's index (murmur3's 32-bit finaliser) into a uniform
  number, then -log(-log(u)). `runtime/sampling.py` computes the same numbers in PyTorch.
- The draw: argmax of scaled logit + noise over the kept candidates (the Gumbel-max trick:
  the same distribution as sampling the softmax); the argmax of the logits where the row's
  temperature is 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A row is held in registers: 16 warps keep 32768 candidates (the text vocabulary) at 64 a thread, 32 this many.
WIDEST_ROW = 1 << 16
# The draw reads the row again in chunks of this many candidates: registers for the search.
DRAW_CHUNK = 4096
_KEY_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}


@triton.jit
def _fmix32(h):
    """murmur3's finaliser: every input bit flips about half the output bits (uint32)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _gumbel(row_key, columns):
    """Gumbel noise of each candidate: -log(-log(u)), u uniform in (0, 1) from the row's key
    (int64) and the candidate's index. u is an odd multiple of 2^-24, exact in float32."""
    low = (row_key & 0xFFFFFFFF).to(tl.uint32)
    high = ((row_key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    bits = _fmix32((low + columns.to(tl.uint32)) ^ high)
    uniform = ((bits >> 9).to(tl.float32) * 2.0 + 1.0) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(uniform))


@triton.jit
def _row_keys(logits_ptr, row, row_stride, columns, width, KEY_BITS: tl.constexpr):
    """The row's logits as ordered integer keys; past the row's end the smallest key, which the
    search never counts."""
    raw = tl.load(logits_ptr + row * row_stride + columns, mask=columns < width, other=0.0)
    if KEY_BITS == 16:
        patterns = raw.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
    else:
        patterns = raw.to(tl.int32, bitcast=True)
    return tl.where(columns < width, _flip_negatives(patterns, KEY_BITS), -(1 << (KEY_BITS - 1)))


@triton.jit
def _flip_negatives(x, KEY_BITS: tl.constexpr):
    """Bit pattern <-> ordered key (the same map both ways): a negative float's magnitude bits
    are flipped, so that a larger magnitude gives a smaller integer."""
    return tl.where(x < 0, x ^ ((1 << (KEY_BITS - 1)) - 1), x)


@triton.jit
def _key_value(key, TYPE: tl.constexpr, KEY_BITS: tl.constexpr):
    """The logit (float32) whose key is `key`."""
    patterns = _flip_negatives(key, KEY_BITS)
    if KEY_BITS == 16:
        value = patterns.to(tl.int16).to(TYPE, bitcast=True)
    else:
        value = patterns.to(TYPE, bitcast=True)
    return value.to(tl.float32)


@triton.jit
def _sample_top_k(logits_ptr, row_stride, temperature_ptr, top_k_ptr, keys_ptr, out_ptr, width,
                  BLOCK: tl.constexpr, CHUNK: tl.constexpr, KEY_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    # 1. The k-th largest key: the whole row's keys in registers, and nothing else (the text
    # row's 32768 take 64 registers a thread at 16 warps).
    keys = _row_keys(logits_ptr, row, row_stride, tl.arange(0, BLOCK), width, KEY_BITS)
    k = tl.minimum(tl.maximum(tl.load(top_k_ptr + row), 1), width).to(tl.int32)
    # The sign first, then each lower bit: within [kth, kth + 2^(bit+1)) setting a bit raises the key.
    kth = tl.where(tl.sum((keys >= 0).to(tl.int32), axis=0) >= k, 0, -(1 << (KEY_BITS - 1)))
    for bit in tl.static_range(KEY_BITS - 2, -1, -1):
        candidate = kth | (1 << bit)
        kth = tl.where(tl.sum((keys >= candidate).to(tl.int32), axis=0) >= k, candidate, kth)
    # 2. The draw, CHUNK candidates at a time (read again, from L1): the argmax of the logits and
    # that of scaled logit + noise over the kept ones, each the first index among equals.
    temperature = tl.load(temperature_ptr + row)
    divisor = tl.where(temperature > 0, temperature, 1.0)
    threshold = _key_value(kth, logits_ptr.dtype.element_ty, KEY_BITS) / divisor
    row_key = tl.load(keys_ptr + row)
    best_logit, greedy = float("-inf"), 0
    best_score, sampled = float("-inf"), 0
    for first in tl.range(0, BLOCK, CHUNK):
        columns = first + tl.arange(0, CHUNK)
        values = tl.load(logits_ptr + row * row_stride + columns, mask=columns < width, other=float("-inf"))
        values = values.to(tl.float32)
        scaled = values / divisor
        scores = tl.where(scaled >= threshold, scaled + _gumbel(row_key, columns), float("-inf"))
        chunk_logit, chunk_greedy = tl.max(values, axis=0, return_indices=True)
        chunk_score, chunk_sampled = tl.max(scores, axis=0, return_indices=True)
        greedy = tl.where(chunk_logit > best_logit, first + chunk_greedy, greedy)
        best_logit = tl.maximum(best_logit, chunk_logit)
        sampled = tl.where(chunk_score > best_score, first + chunk_sampled, sampled)
        best_score = tl.maximum(best_score, chunk_score)
    tl.store(out_ptr + row, tl.where(temperature > 0, sampled, greedy).to(tl.int64))


def default_warps(width: int) -> int:
    """Warps per row: at most 64 of the row's candidates a thread. Measured on an H200
    (bench/sampling.py, one row): the 2048 audio candidates take 6.4 us at 4 warps (9.5 at 2, 7.0
    at 8), the 32000 text ones 34 us at 16 (42 at 8, 39 at 32)."""
    block = triton.next_power_of_2(width)
    return 4 if block <= 4096 else 16 if block <= 32768 else 32


def launch_sample_top_k(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, row_keys: torch.Tensor,
                        num_warps: int | None = None) -> torch.Tensor:
    """`sample_top_k` with the launch's warps chosen (the benchmark sweeps them)."""
    rows, width = logits.shape
    if logits.dtype not in _KEY_BITS or width > WIDEST_ROW:
        raise ValueError(f"sample_top_k takes rows of at most {WIDEST_ROW} bf16, float16 or float32 logits, "
                         f"not {logits.dtype} x {width}")
    if not (temperature.shape == top_k.shape == row_keys.shape == (rows,)):
        raise ValueError(f"sample_top_k: one temperature, top-k and noise key per row ({rows}), got "
                         f"{tuple(temperature.shape)}, {tuple(top_k.shape)}, {tuple(row_keys.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, device=logits.device, dtype=torch.int64)
    block = triton.next_power_of_2(width)
    _sample_top_k[(rows,)](logits, logits.stride(0), temperature.float().contiguous(), top_k.contiguous(),
                           row_keys.contiguous(), out, width, BLOCK=block, CHUNK=min(block, DRAW_CHUNK),
                           KEY_BITS=_KEY_BITS[logits.dtype], num_warps=num_warps or default_warps(width))
    return out


@torch.library.custom_op("personaplex::sample_top_k", mutates_args=())
def sample_top_k(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                 row_keys: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [B, V] (bf16, float16 or float32): top-k sampling at each row's
    temperature [B] (its own top_k [B], clamped to 1..V), the argmax where the temperature is 0;
    row_keys [B] int64 seed the rows' noise (`runtime/sampling.RowNoise.next_keys`).
    Returns [B] int64."""
    return launch_sample_top_k(logits, temperature, top_k, row_keys)


@sample_top_k.register_fake
def _sample_top_k_shape(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                        row_keys: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.int64)
