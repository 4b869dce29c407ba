"""The Triton ring attention (`kernels/ring_attention.py`) against the readable way of doing
the same: the kernel alone at the three shapes the model runs it at (a live LM frame, a Mimi
transformer call, a depformer step), then inside the LM's streaming path over 64
teacher-forced frames (the compiled, graphed frame is checked whole by test_fast_path.py).

The CPU variants run the kernel in Triton's interpreter at small shapes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.model.random_init import build_random_lm, compare_logits, random_codes, teacher_forced_logits
from tests.gpu.common import CUDA, FRAMES, ROWS, SCALES, device_of, interpreter_or_skip, lm_config, record


# ---------------------------------------------------------------------------- the kernel alone


def readable_ring_attention(q, new_keys, new_values, keys, values, last_position):
    """What the kernel must do, written plainly: store the T new steps' keys/values at slot
    position % slots, then SDPA in float32 over the slots whose newest position p satisfies
    0 <= p <= the query's position. Mutates keys/values like the kernel."""
    steps, capacity = q.shape[2], keys.shape[2]
    positions = last_position[:, None] - (steps - 1) + torch.arange(steps, device=q.device)  # [B, T]
    for row in range(q.shape[0]):
        for step in range(steps):
            slot = int(positions[row, step]) % capacity
            keys[row, :, slot] = new_keys[row, :, step].to(keys.dtype)
            values[row, :, slot] = new_values[row, :, step].to(values.dtype)
    slots = torch.arange(capacity, device=q.device)
    newest = last_position[:, None] - (last_position[:, None] - slots) % capacity  # [B, slots]
    visible = (newest[:, None, :] >= 0) & (newest[:, None, :] <= positions[:, :, None])
    return torch.nn.functional.scaled_dot_product_attention(q.float(), keys.float(), values.float(), visible[:, None])


# (batch, heads, new steps, slots, head dim): the model's shapes on CUDA, smaller ones on the CPU
# (with a ring of several splits, so that the merge runs too, and head dims that the
# kernel pads to the tensor cores' 16: 8, and 12, not a power of 2).
SHAPES = {
    "cuda": {"lm frame": (4, 32, 1, 2999, 128), "mimi call": (4, 8, 2, 249, 64), "depformer step": (4, 16, 1, 8, 64)},
    "cpu": {"lm frame": (3, 2, 1, 600, 16), "mimi call": (3, 2, 2, 23, 12), "depformer step": (3, 2, 1, 8, 8)},
}
CACHE_TYPES = [torch.float32, torch.bfloat16, torch.float8_e4m3fn]


def newest_positions(steps: int, capacity: int) -> list[int]:
    """One row per case: just started, partly filled, the last position before the wrap, wrapped."""
    return [steps - 1, capacity // 3, capacity - 1, 3 * capacity + 5]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("use", ["lm frame", "mimi call", "depformer step"])
@pytest.mark.parametrize("cache_type", CACHE_TYPES, ids=["float32", "bf16", "fp8"])
def test_ring_kernel_writes_then_attends_like_the_readable_code(scale, use, cache_type):
    interpreter_or_skip(scale)
    if cache_type == torch.float8_e4m3fn and not CUDA:
        pytest.skip("Triton's interpreter rounds to float8 its own way; fp8 rings are checked on CUDA")
    from personaplex.model.kernels.ring_attention import ring_attention

    batch, heads, steps, capacity, head_dim = SHAPES[scale][use]
    device = device_of(scale)
    activations = torch.float32 if cache_type == torch.float32 else torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    q, new_keys, new_values = (torch.randn(batch, heads, steps, head_dim, device=device, generator=gen, dtype=activations)
                               for _ in range(3))
    keys, values = (torch.randn(batch, heads, capacity, head_dim, device=device, generator=gen).to(cache_type)
                    for _ in range(2))
    last = torch.tensor(newest_positions(steps, capacity)[:batch], device=device)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected = readable_ring_attention(q, new_keys, new_values, expected_keys, expected_values, last)

    out = ring_attention(q, new_keys, new_values, keys, values, last - (steps - 1))  # the call's first positions
    assert out.dtype == q.dtype and out.shape == q.shape
    # The rings hold exactly the same bytes; the outputs differ by summation order only.
    assert torch.equal(keys.view(torch.uint8), expected_keys.view(torch.uint8))
    assert torch.equal(values.view(torch.uint8), expected_values.view(torch.uint8))
    bound = 1e-5 if activations == torch.float32 else 1e-2
    assert float((out.float() - expected).norm() / expected.norm()) < bound
    # The same call again: the same output, so the splits' merge counters were left at zero.
    assert torch.equal(ring_attention(q, new_keys, new_values, keys, values, last - (steps - 1)), out)


@pytest.mark.parametrize("scale", SCALES)
def test_ring_kernel_takes_strided_steps(scale):
    """Mimi hands the kernel its values as a view of the fused projection (not contiguous)."""
    interpreter_or_skip(scale)
    from personaplex.model.kernels.ring_attention import ring_attention

    device = device_of(scale)
    qkv = torch.randn(2, 2, 3, 4, 16, device=device).permute(2, 0, 3, 1, 4)  # [3, B=2, H=4, T=2, D] views
    keys, values = torch.randn(2, 2, 4, 11, 16, device=device).unbind(0)
    keys, values = keys.contiguous(), values.contiguous()
    last = torch.tensor([1, 20], device=device)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected = readable_ring_attention(*qkv, expected_keys, expected_values, last)
    out = ring_attention(*qkv, keys, values, last - 1)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert float((out - expected).norm() / expected.norm()) < 1e-5


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("use", ["lm frame", "mimi call"])
def test_ring_kernel_rotates_queries_and_keys_like_rope(scale, use):
    """Given the call's RoPE tables, the kernel takes q and k before RoPE, as views of the fused
    projection, and does what `layers.rope` then the kernel do."""
    interpreter_or_skip(scale)
    from personaplex.model.kernels.ring_attention import ring_attention
    from personaplex.model.layers import rope, rope_angles

    batch, heads, steps, capacity, head_dim = SHAPES[scale][use]
    device = device_of(scale)
    activations = torch.bfloat16 if scale == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(1)
    projected = torch.randn(batch, steps, 3, heads, head_dim, device=device, generator=gen).to(activations)
    q, new_keys, new_values = projected.permute(2, 0, 3, 1, 4)  # [B, H, T, D] views, as the models split them
    keys, values = (torch.randn(batch, heads, capacity, head_dim, device=device, generator=gen).to(activations)
                    for _ in range(2))
    last = torch.tensor(newest_positions(steps, capacity)[:batch], device=device)
    positions = last[:, None] - (steps - 1) + torch.arange(steps, device=device)
    cos, sin = rope_angles(positions, head_dim, 10_000)  # [B, T, D/2]
    expected_keys, expected_values = keys.clone(), values.clone()
    expected = ring_attention(rope(q, cos, sin), rope(new_keys, cos, sin), new_values, expected_keys, expected_values,
                              positions[:, 0])
    out = ring_attention(q, new_keys, new_values, keys, values, positions[:, 0], cos, sin)
    assert torch.equal(values, expected_values)
    if scale == "cpu":  # the same float32 operations: the same bytes
        assert torch.equal(keys, expected_keys) and torch.equal(out, expected)
    else:  # on the GPU the rotation may fuse a multiply-add: the keys round alike but for the odd last bit
        assert float((keys.float() - expected_keys.float()).abs().max()) <= 2 ** -7 * float(expected_keys.abs().max())
        assert float((out.float() - expected.float()).norm() / expected.float().norm()) < 1e-2


def test_ring_kernel_refuses_rope_tables_of_the_wrong_shape():
    from personaplex.model.kernels.ring_attention import launch_ring_attention, DEFAULT_LAUNCH

    q = torch.zeros(1, 2, 1, 8)
    rings = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"RoPE tables must both be \[1, 1, 4\]"):
        launch_ring_attention(q, q, q, rings, rings.clone(), torch.zeros(1, dtype=torch.long), DEFAULT_LAUNCH,
                              torch.zeros(1, 1, 3), torch.zeros(1, 1, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the rings take 4.3 GB")
def test_ring_kernel_reaches_rows_past_2_to_the_31_bytes():
    """176 rows of fp8 rings at the LM's shape: the last rows start past byte 2^31 of the
    cache (a 32-bit offset would wrap there and read another row's keys)."""
    from personaplex.model.kernels.ring_attention import ring_attention

    batch, heads, capacity, head_dim = 176, 32, 2999, 128
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, new_keys, new_values = (torch.randn(batch, heads, 1, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
                               for _ in range(3))
    keys, values = (torch.randn(batch, heads, capacity, head_dim, device="cuda", dtype=torch.bfloat16,
                                generator=gen).to(torch.float8_e4m3fn) for _ in range(2))
    last = torch.full((batch,), 3 * capacity + 5, device="cuda")
    rows = slice(batch - 2, batch)
    expected_keys, expected_values = keys[rows].clone(), values[rows].clone()
    expected = readable_ring_attention(q[rows], new_keys[rows], new_values[rows], expected_keys, expected_values, last[rows])
    out = ring_attention(q, new_keys, new_values, keys, values, last)  # one step: first = last
    assert torch.equal(keys[rows].view(torch.uint8), expected_keys.view(torch.uint8))
    assert float((out[rows].float() - expected).norm() / expected.norm()) < 1e-2


# ---------------------------------------------------------------------------- inside the LM


def fast_kernels(scale: str) -> Kernels:
    """What the streamed logits below run against the readable forward: the fast frame's Triton
    kernels (`Kernels.fast()`), the ring attentions (temporal and depformer) and, on the GPU at
    these two rows, the GEMV for the plain linears. The CPU variant leaves the GEMV out: in
    Triton's interpreter it made each test 9x longer (118 s against 13), and its own tests
    cover it there; the CPU comparison thus isolates the attention."""
    return Kernels.fast() if scale == "cuda" else dataclasses.replace(Kernels.fast(), gemv=False)


# float32: the two attentions differ only in summation order; bf16: in where they round.
FAST_PATH_BOUNDS = {torch.float32: (1e-4, 0.99), torch.bfloat16: (2e-2, 0.9)}  # relative error, greedy agreement


def measure_streamed_logits(scale: str, dtype: torch.dtype, context: int) -> dict[str, float]:
    """The comparison of the test below; the model lives only here (a failing assertion keeps
    its frame's locals alive)."""
    config = dataclasses.replace(lm_config(scale), context=context)
    device = device_of(scale)
    lm = build_random_lm(config, device, dtype, "trained-like")
    codes = random_codes(config, FRAMES[scale], ROWS, device=device)
    readable = teacher_forced_logits(lm, codes, streaming=True, kernels=READABLE_KERNELS)
    fast = teacher_forced_logits(lm, codes, streaming=True, kernels=fast_kernels(scale))
    return compare_logits(fast, readable)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize("context", [3000, 12], ids=["ring-3000", "ring-12-wraps"])
def test_streamed_logits_with_ring_kernel_against_sdpa(scale: str, dtype: torch.dtype, context: int) -> None:
    """Teacher-forced logits of 64 streamed frames x 2 rows (16 on the CPU; KV ring, depformer
    steps), the Triton ring attention against SDPA. With a 12-frame context the ring (11
    slots) wraps at frame 11, so most frames attend over a full ring."""
    interpreter_or_skip(scale)
    stats = measure_streamed_logits(scale, dtype, context)
    record(f"streamed logits, ring kernel vs SDPA, {dtype}, context {context} [{scale}]", stats)
    max_err, min_agree = FAST_PATH_BOUNDS[dtype]
    worst_factor = 1 if dtype == torch.float32 else 3
    for head in ("text", "audio"):
        assert stats[f"{head}_err"] < max_err and stats[f"{head}_worst"] < worst_factor * max_err, stats
        assert stats[f"{head}_agree"] >= min_agree, stats
