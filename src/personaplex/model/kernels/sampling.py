"""Top-k sampling of one token per row in one launch: the threshold, the noise and the draw.

The readable sampler (`runtime/sampling.py`) scales a row's logits by its temperature, keeps
the candidates at or above the k-th largest scaled logit (found by sorting the row), adds
Gumbel noise to those and takes the argmax. Compiled, that was ~4 kernels a token, plus a
sort or a search for the k-th value: a frame samples nine tokens (one text, eight audio), and
on an H200 a one-row frame spent ~0.2 ms there (bench/results/h200-frame-kernels-runR-*.tsv:
the text token alone ~85 us over 14 kernels). Here it is one launch of a few programs a row:

- The k-th largest, without sorting. A float's bit pattern, read as a signed integer with
  the magnitude bits of negative numbers flipped (a "key"), orders as the float does, so the
  k-th largest key is built from the top bit down, keeping each bit where at least k keys are
  at or above the prefix with that bit set. The search runs over the logits as stored: a
  bf16 row takes 16 steps, not the 32 of its float32 scaled values. Scaling by 1 / T is
  monotone, so the k-th largest scaled logit is the scaled value of the k-th largest logit:
  the same threshold the sort finds (ties at it are all kept, as there).
- The row in parts. Each program searches its part of the row (at most 2048 candidates) for
  the part's own k-th largest key and stores the part's candidates at or above it (in column
  order; at most CAP). The row's k-th largest is the k-th largest of those (each part's k
  largest are among them), and every key at or above it is there too (a part's keys above the
  row's threshold are above its own): the last program of the row to finish (a counter)
  searches the few stored candidates for it and draws among them. The 32000 text candidates
  thus take 16 programs, not one: 33 -> 12.7 us a token on an H200 (docs/PERFORMANCE.md, run Y).
  Where a part keeps more than CAP (a top-k past CAP, or many logits tied at a part's
  threshold), the last program searches and draws over the whole row instead: slower, the same
  token.
- The noise: a per-row key (splitmix64 of the row's seed and draw counter, computed by the
  caller) hashed with each candidate's index (murmur3's 32-bit finaliser) into a uniform
  number, then -log(-log(u)). `runtime/sampling.py` computes the same numbers in PyTorch.
- The draw: argmax of scaled logit + noise over the kept candidates (the Gumbel-max trick:
  the same distribution as sampling the softmax); the argmax of the logits where the row's
  temperature is 0. Both take the first column among equals, as `argmax` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import SAMPLING_PART_WIDTH

WIDEST_ROW = 1 << 16
KEY_BITS_OF_DTYPE = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}


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
def ordered_keys(logits_ptr, row, row_stride, columns, width, KEY_BITS: tl.constexpr, FROM_L2: tl.constexpr):
    """The row's logits at `columns` as ordered integer keys; past the row's end the smallest
    key, which the search never counts. FROM_L2: for logits another program of the same
    launch wrote (never a stale line of this SM's L1)."""
    if FROM_L2:
        raw = tl.load(logits_ptr + row * row_stride + columns, mask=columns < width, other=0.0, cache_modifier=".cg")
    else:
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
def kth_key(keys, k, KEY_BITS: tl.constexpr):
    """The k-th largest of `keys`: the sign first, then each lower bit (within [kth, kth +
    2^(bit+1)) setting a bit raises the key)."""
    kth = tl.where(tl.sum((keys >= 0).to(tl.int32), axis=0) >= k, 0, -(1 << (KEY_BITS - 1)))
    for bit in tl.static_range(KEY_BITS - 2, -1, -1):
        candidate = kth | (1 << bit)
        kth = tl.where(tl.sum((keys >= candidate).to(tl.int32), axis=0) >= k, candidate, kth)
    return kth


@triton.jit
def draw(keys, present, kth, divisor, row_key, columns, TYPE: tl.constexpr, KEY_BITS: tl.constexpr):
    """Among the `present` candidates (at `columns`): the best score (scaled logit + noise, over
    those at or above the key kth) and its place in `keys`, the largest logit and its place;
    the first place among equals."""
    values = tl.where(present, _key_value(keys, TYPE, KEY_BITS), float("-inf"))
    scaled = values / divisor
    threshold = _key_value(kth, TYPE, KEY_BITS) / divisor
    scores = tl.where(present & (scaled >= threshold), scaled + _gumbel(row_key, columns), float("-inf"))
    best_score, sampled = tl.max(scores, axis=0, return_indices=True)
    best_logit, greedy = tl.max(values, axis=0, return_indices=True)
    return best_score, sampled, best_logit, greedy


@triton.jit
def _column_at(columns, place):
    """columns[place] (a gather across the program)."""
    return tl.sum(tl.where(tl.arange(0, columns.shape[0]) == place, columns, 0), axis=0)


@triton.jit
def _whole_row_draw(logits_ptr, row, row_stride, width, k, divisor, row_key, PART: tl.constexpr,
                    PARTS: tl.constexpr, KEY_BITS: tl.constexpr):
    """(sampled, greedy) by one program over the whole row, a part at a time: the search counts
    every part at every bit. Where a part kept more candidates than it could store."""
    kth = -(1 << (KEY_BITS - 1))
    for bit in tl.static_range(KEY_BITS - 1, -1, -1):
        # The sign bit first: from the smallest key, "setting" it means trying 0.
        candidate = 0 if bit == KEY_BITS - 1 else kth | (1 << bit)
        count = 0
        for part in tl.range(0, PARTS):
            columns = part * PART + tl.arange(0, PART)
            keys = ordered_keys(logits_ptr, row, row_stride, columns, width, KEY_BITS, False)
            count += tl.sum((keys >= candidate).to(tl.int32), axis=0)
        kth = tl.where(count >= k, candidate, kth)
    best_score, sampled = float("-inf"), 0
    best_logit, greedy = float("-inf"), 0
    for part in tl.range(0, PARTS):
        columns = part * PART + tl.arange(0, PART)
        keys = ordered_keys(logits_ptr, row, row_stride, columns, width, KEY_BITS, False)
        part_score, part_sampled, part_logit, part_greedy = draw(keys, columns < width, kth, divisor, row_key,
                                                                  columns, logits_ptr.dtype.element_ty, KEY_BITS)
        sampled = tl.where(part_score > best_score, part * PART + part_sampled, sampled)
        best_score = tl.maximum(best_score, part_score)
        greedy = tl.where(part_logit > best_logit, part * PART + part_greedy, greedy)
        best_logit = tl.maximum(best_logit, part_logit)
    return sampled, greedy


@triton.jit
def _sample_top_k(logits_ptr, row_stride, temperature_ptr, top_k_ptr, keys_ptr, out_ptr, width,
                  kept_keys_ptr, kept_columns_ptr, counts_ptr, tickets_ptr,
                  PART: tl.constexpr, PARTS: tl.constexpr, CAP: tl.constexpr, KEY_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    k = tl.minimum(tl.maximum(tl.load(top_k_ptr + row), 1), width).to(tl.int32)
    temperature = tl.load(temperature_ptr + row)
    divisor = tl.where(temperature > 0, temperature, 1.0)
    row_key = tl.load(keys_ptr + row)
    # 1. This part's k-th largest key.
    columns = part * PART + tl.arange(0, PART)
    keys = ordered_keys(logits_ptr, row, row_stride, columns, width, KEY_BITS, False)
    kth = kth_key(keys, k, KEY_BITS)
    if PARTS == 1:  # the whole row is here: draw from the registers
        _, sampled, _, greedy = draw(keys, columns < width, kth, divisor, row_key, columns,
                                      logits_ptr.dtype.element_ty, KEY_BITS)
        tl.store(out_ptr + row, tl.where(temperature > 0, sampled, greedy).to(tl.int64))  # places are columns
    else:
        _store_part_candidates(keys, columns, kth, width, row, part, kept_keys_ptr, kept_columns_ptr, counts_ptr,
                               PARTS, CAP)
        # 2. The row's last program to get here draws (each program counts itself in after its
        # stores, a release; the last, acquiring, sees every part's).
        tl.debug_barrier()
        if tl.atomic_add(tickets_ptr + row, 1, sem="acq_rel", scope="gpu") == PARTS - 1:
            sampled, greedy = _draw_from_parts(logits_ptr, row, row_stride, width, k, divisor, row_key, kept_keys_ptr,
                                               kept_columns_ptr, counts_ptr, PART, PARTS, CAP, KEY_BITS)
            tl.store(out_ptr + row, tl.where(temperature > 0, sampled, greedy).to(tl.int64))
            tl.store(tickets_ptr + row, 0)  # as the next call expects it


@triton.jit
def _store_part_candidates(keys, columns, kth, width, row, part, kept_keys_ptr, kept_columns_ptr, counts_ptr,
                           PARTS: tl.constexpr, CAP: tl.constexpr):
    """A part's candidates at or above its own k-th largest key, in column order (the first CAP
    of them), and how many there are."""
    kept = ((keys >= kth) & (columns < width)).to(tl.int32)
    places = tl.cumsum(kept, axis=0) - 1
    first_place = (row * PARTS + part) * CAP
    stored = (kept == 1) & (places < CAP)
    tl.store(kept_keys_ptr + first_place + places, keys, mask=stored)
    tl.store(kept_columns_ptr + first_place + places, columns, mask=stored)
    tl.store(counts_ptr + row * PARTS + part, tl.sum(kept, axis=0))


@triton.jit
def _draw_from_parts(logits_ptr, row, row_stride, width, k, divisor, row_key, kept_keys_ptr, kept_columns_ptr,
                     counts_ptr, PART: tl.constexpr, PARTS: tl.constexpr, CAP: tl.constexpr, KEY_BITS: tl.constexpr):
    """(sampled, greedy) from every part's stored candidates (read from L2: other programs wrote
    them), or from the whole row where a part had more than it could store."""
    counts = tl.load(counts_ptr + row * PARTS + tl.arange(0, PARTS), cache_modifier=".cg")
    if tl.max(counts, axis=0) <= CAP:
        slots = tl.arange(0, PARTS * CAP)  # part p's places: p * CAP ..
        present = slots % CAP < tl.load(counts_ptr + row * PARTS + slots // CAP, cache_modifier=".cg")
        candidates = tl.load(kept_keys_ptr + row * PARTS * CAP + slots, mask=present,
                             other=-(1 << (KEY_BITS - 1)), cache_modifier=".cg")
        candidate_columns = tl.load(kept_columns_ptr + row * PARTS * CAP + slots, mask=present, other=0,
                                    cache_modifier=".cg")
        kth = kth_key(candidates, k, KEY_BITS)
        _, sampled, _, greedy = draw(candidates, present, kth, divisor, row_key, candidate_columns,
                                      logits_ptr.dtype.element_ty, KEY_BITS)
        sampled, greedy = _column_at(candidate_columns, sampled), _column_at(candidate_columns, greedy)
    else:
        sampled, greedy = _whole_row_draw(logits_ptr, row, row_stride, width, k, divisor, row_key, PART, PARTS,
                                          KEY_BITS)
    return sampled, greedy


def row_parts(width: int) -> tuple[int, int, int]:
    """How a row of `width` candidates is shared out: candidates a program, programs a row, and
    candidates a part may store (none for a row in one part, which draws from its registers; 64
    a part of the text row's 16, its top 25 with their ties; fewer parts, more each)."""
    block = triton.next_power_of_2(width)
    part = min(block, SAMPLING_PART_WIDTH)
    parts = block // part
    return part, parts, 0 if parts == 1 else max(64, 512 // parts)


def default_warps(width: int) -> int:
    """Warps per program: 4 (at most 16 candidates a thread)."""
    return 4


def launch_sample_top_k(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, row_keys: torch.Tensor,
                        num_warps: int | None = None) -> torch.Tensor:
    """`sample_top_k` with the launch's warps chosen (the benchmark sweeps them)."""
    rows, width = logits.shape
    if logits.dtype not in KEY_BITS_OF_DTYPE or width > WIDEST_ROW:
        raise ValueError(f"sample_top_k takes rows of at most {WIDEST_ROW} bf16, float16 or float32 logits, "
                         f"not {logits.dtype} x {width}")
    if not (temperature.shape == top_k.shape == row_keys.shape == (rows,)):
        raise ValueError(f"sample_top_k: one temperature, top-k and noise key per row ({rows}), got "
                         f"{tuple(temperature.shape)}, {tuple(top_k.shape)}, {tuple(row_keys.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    part, parts, cap = row_parts(width)
    out = torch.empty(rows, device=logits.device, dtype=torch.int64)
    kept_keys = torch.empty(max(1, rows * parts * cap), device=logits.device, dtype=torch.int32)  # unread in one part
    kept_columns = torch.empty_like(kept_keys)
    counts = torch.empty(rows * parts, device=logits.device, dtype=torch.int32)
    tickets = torch.zeros(rows, device=logits.device, dtype=torch.int32)  # the last program sets its row's back
    _sample_top_k[(rows, parts)](logits, logits.stride(0), temperature.float().contiguous(), top_k.contiguous(),
                                 row_keys.contiguous(), out, width, kept_keys, kept_columns, counts, tickets,
                                 PART=part, PARTS=parts, CAP=cap, KEY_BITS=KEY_BITS_OF_DTYPE[logits.dtype],
                                 num_warps=num_warps or default_warps(width))
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
