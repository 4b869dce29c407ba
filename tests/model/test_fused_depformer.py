"""The fused depformer step (`model/kernels/fused_depformer.py`) against the readable
`LMModel.depformer_step`, on the CPU: the kernel's phases launched one by one in Triton's
interpreter, on a tiny LM (widths and a hidden size that are not multiples of the kernel's
tiles, 4 heads of 8). Several steps in sequence, so that later steps attend over keys the
fused steps wrote; the caches are compared too, so that both paths can share one state.
The persistent (one-launch) mode runs on CUDA: tests/gpu/test_fused_depformer.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.model.quantize import quantize_model
from personaplex.runtime.sampling import sample_tokens
from tests.fixtures.tiny_lm import random_lm, tiny_lm_config
from tests.gpu.common import GemvRows, interpreter_or_skip

FUSED = Kernels(fused_depformer_max_rows=1 << 30)
STEPS = 4


@pytest.fixture(scope="module")
def lm():
    return random_lm(tiny_lm_config(card=80))


def steps_of(lm, kernels: Kernels, hidden: torch.Tensor, tokens: torch.Tensor, state) -> torch.Tensor:
    return torch.stack([lm.depformer_step(k, hidden, tokens[:, k], state, kernels) for k in range(tokens.shape[1])], 1)


@pytest.mark.parametrize("rows", [1, 3, 9])  # 9: on the tensor cores (padded to 16 rows)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_fused_steps_match_the_readable_steps(lm, rows, dtype):
    interpreter_or_skip("cpu")
    model = lm.to(dtype)
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 1, model.config.dim, generator=gen).to(dtype)
    tokens = torch.randint(0, model.config.card, (rows, STEPS), generator=gen)
    tokens[0, 1] = -1  # "no input": embeds to zero
    readable_state, fused_state = model.new_depformer_state(rows), model.new_depformer_state(rows)
    expected = steps_of(model, READABLE_KERNELS, hidden, tokens, readable_state)
    fused = steps_of(model, FUSED, hidden, tokens, fused_state)
    assert fused.dtype == dtype and fused.shape == expected.shape
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((fused, expected), (fused_state.keys, readable_state.keys),
                      (fused_state.values, readable_state.values)):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < bound


@pytest.mark.parametrize("rows", [1, 2])
def test_unfused_steps_of_one_or_two_rows_take_the_gemv(lm, rows):
    """With the fused step off (as frames of two rows run), a step's every product (the input
    product, each layer's four, the logits head) goes to the GEMV kernel at one or two rows,
    and the steps give the readable steps' logits and caches."""
    interpreter_or_skip("cpu")
    model = lm.float()
    kernels = dataclasses.replace(Kernels.fast(), fused_depformer_max_rows=0)
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 1, model.config.dim, generator=gen)
    tokens = torch.randint(0, model.config.card, (rows, STEPS), generator=gen)
    readable_state, gemv_state = model.new_depformer_state(rows), model.new_depformer_state(rows)
    expected = steps_of(model, READABLE_KERNELS, hidden, tokens, readable_state)
    with GemvRows() as gemv:
        got = steps_of(model, kernels, hidden, tokens, gemv_state)
    assert gemv.rows == [rows] * STEPS * (2 + 4 * len(model.depformer.layers))
    for got_tensor, want in ((got, expected), (gemv_state.keys, readable_state.keys),
                             (gemv_state.values, readable_state.values)):
        assert float((got_tensor - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("shape", [(8, 256, 4, 1), (32, 4096, 8, 4)], ids=["narrow", "wide"])
@pytest.mark.parametrize("rows", [2, 9])
def test_every_launch_shape_computes_the_same_step(lm, shape, rows):
    """Column tiles narrower and wider than the layers' widths, K in several iterations or one."""
    interpreter_or_skip("cpu")
    from personaplex.model.kernels.fused_depformer import LaunchShape, launch_fused_depformer_step

    model = lm.float()
    hidden = torch.randn(rows, 1, model.config.dim)
    tokens = torch.randint(0, model.config.card, (rows,))
    readable_state, fused_state = model.new_depformer_state(rows), model.new_depformer_state(rows)
    expected = model.depformer_step(0, hidden, tokens, readable_state, READABLE_KERNELS)
    x = model.depformer_input(0, hidden, tokens)[:, 0]
    fused = launch_fused_depformer_step(x, model.depformer_step_weights(0), model.linears[0].weight,
                                        fused_state.keys, fused_state.values, 0, model.config.norm_eps,
                                        persistent=False, shape=LaunchShape(*shape))
    assert float((fused - expected).norm() / expected.norm()) < 1e-5


def test_tiles_on_the_cuda_cores_leave_no_program_more_than_one():
    """PersonaPlex's depformer on an H200's 264 programs: each product's columns in the
    narrowest tiles that still give every program at most one (the 1024-output products in
    tiles of 4, not 64 programs of 16 columns), K whole where the weight tile allows."""
    from personaplex.model.kernels.fused_depformer import LaunchShape, tile_constants

    tiles = tile_constants(1, LaunchShape.for_rows(1), programs=264, dim=1024, hidden=2816, card=2048)
    assert [tiles[f"{name}_N"] for name in ("QKV", "OUT", "GATE", "FFN", "HEAD")] == [16, 4, 16, 4, 8]
    assert [tiles[f"{name}_K"] for name in ("QKV", "GATE", "FFN", "HEAD")] == [1024, 1024, 4096, 1024]
    assert tiles["PHASES_PER_LAYER"] == 4 and not tiles["ON_TENSOR_CORES"]
    on_tensor_cores = tile_constants(9, LaunchShape.for_rows(9), programs=132, dim=1024, hidden=2816, card=2048)
    assert on_tensor_cores["PHASES_PER_LAYER"] == 5 and on_tensor_cores["OUT_N"] == 32


def test_attention_over_several_chunks_of_slots(lm):
    """Attention held two cache slots at a time: from step 2 on, its softmax runs over
    several chunks (online), and the steps still give the readable steps' logits and caches."""
    interpreter_or_skip("cpu")
    from personaplex.model.kernels.fused_depformer import LaunchShape, launch_fused_depformer_step

    model = lm.float()
    hidden = torch.randn(2, 1, model.config.dim)
    tokens = torch.randint(0, model.config.card, (2, 5))
    readable_state, fused_state = model.new_depformer_state(2), model.new_depformer_state(2)
    expected = steps_of(model, READABLE_KERNELS, hidden, tokens, readable_state)
    fused = torch.stack([
        launch_fused_depformer_step(model.depformer_input(k, hidden, tokens[:, k])[:, 0],
                                    model.depformer_step_weights(k), model.linears[k].weight, fused_state.keys,
                                    fused_state.values, k, model.config.norm_eps, persistent=False,
                                    shape=LaunchShape(16, 4096, 4, 1, attention_slots=2))
        for k in range(tokens.shape[1])], 1)
    for got, want in ((fused, expected), (fused_state.keys, readable_state.keys),
                      (fused_state.values, readable_state.values)):
        assert float((got - want).norm() / want.norm()) < 1e-5


def test_fused_and_readable_steps_share_one_state(lm):
    """A fused step attends over keys a readable step wrote, and the other way round."""
    interpreter_or_skip("cpu")
    model = lm.float()
    hidden = torch.randn(2, 1, model.config.dim)
    tokens = torch.randint(0, model.config.card, (2, STEPS))
    mixed_state, readable_state = model.new_depformer_state(2), model.new_depformer_state(2)
    mixed = torch.stack([model.depformer_step(k, hidden, tokens[:, k], mixed_state,
                                              FUSED if k % 2 else READABLE_KERNELS) for k in range(STEPS)], 1)
    expected = steps_of(model, READABLE_KERNELS, hidden, tokens, readable_state)
    assert float((mixed - expected).norm() / expected.norm()) < 1e-5


def test_frames_with_more_rows_than_the_limit_take_the_readable_step(lm):
    """fused_depformer_max_rows picks the path by the frame's rows: the readable step's result
    is the same bits as the readable kernels'."""
    interpreter_or_skip("cpu")
    model = lm.float()
    hidden = torch.randn(3, 1, model.config.dim)
    tokens = torch.randint(0, model.config.card, (3,))
    expected = model.depformer_step(0, hidden, tokens, model.new_depformer_state(3), READABLE_KERNELS)
    above = model.depformer_step(0, hidden, tokens, model.new_depformer_state(3), Kernels(fused_depformer_max_rows=2))
    within = model.depformer_step(0, hidden, tokens, model.new_depformer_state(3), Kernels(fused_depformer_max_rows=3))
    assert torch.equal(above, expected)
    assert not torch.equal(within, expected) and torch.allclose(within, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
def test_fused_steps_read_fp8_weights_as_the_readable_steps_do(rows, dtype):
    """fp8 codes with one scale per output row: the kernel scales each product's sums once,
    the readable path multiplies the weights out first; the logits head stays in the
    activations' dtype."""
    interpreter_or_skip("cpu")
    model = quantize_model(random_lm(tiny_lm_config(card=80)).to(dtype), "fp8")
    assert model.depformer_step_fusable(0, dtype) and len(model.depformer_step_scales(0)) == 4 * 2
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 1, model.config.dim, generator=gen).to(dtype)
    tokens = torch.randint(0, model.config.card, (rows, STEPS), generator=gen)
    readable_state, fused_state = model.new_depformer_state(rows), model.new_depformer_state(rows)
    expected = steps_of(model, READABLE_KERNELS, hidden, tokens, readable_state)
    fused = steps_of(model, FUSED, hidden, tokens, fused_state)
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in ((fused, expected), (fused_state.keys, readable_state.keys)):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < bound


def test_steps_the_kernel_cannot_read_take_the_readable_path():
    """Plain weights in the activations' dtype or fp8 ones: anything else (int4's groups,
    weights in another dtype) falls back, whatever the kernels."""
    model = random_lm(tiny_lm_config(card=80)).to(torch.bfloat16)
    assert model.depformer_step_fusable(0, torch.bfloat16) and model.depformer_step_scales(0) == []
    assert not model.depformer_step_fusable(0, torch.float32)  # weights in another dtype than the activations
    # int4's attention projections (the tiny FFN widths are not a multiple of its groups)
    quantize_model(model, "int4", group_size=32, include=lambda name: ".in_projs." in name)
    assert not model.depformer_step_fusable(0, torch.bfloat16)


def test_fp8_weights_without_their_scales_are_refused(lm):
    interpreter_or_skip("cpu")
    from personaplex.model.kernels.fused_depformer import launch_fused_depformer_step

    model = quantize_model(random_lm(tiny_lm_config(card=80)), "fp8")
    state = model.new_depformer_state(1)
    x = torch.randn(1, model.config.depformer_dim)
    arguments = (x, model.depformer_step_weights(0), model.linears[0].weight, state.keys, state.values, 0, 1e-5)
    with pytest.raises(ValueError, match="row scales"):
        launch_fused_depformer_step(*arguments, persistent=False, layer_scales=model.depformer_step_scales(0)[:-1])
    with pytest.raises(ValueError, match="row scales"):
        launch_fused_depformer_step(*arguments[:1], lm.float().depformer_step_weights(0), *arguments[2:],
                                    persistent=False, layer_scales=model.depformer_step_scales(0))


def test_phase_timing_needs_cuda(lm):
    """The phase timer reads the GPU's clock: on the CPU, asking for it is refused in one line."""
    interpreter_or_skip("cpu")
    from personaplex.model.kernels.fused_depformer import launch_fused_depformer_step, step_phases

    model = lm.float()
    state = model.new_depformer_state(1)
    x = torch.randn(1, model.config.depformer_dim)
    ends = torch.zeros(2 * step_phases(1, model.config.depformer_num_layers), dtype=torch.int64)
    with pytest.raises(ValueError, match="phase_ends is an int64 tensor on CUDA"):
        launch_fused_depformer_step(x, model.depformer_step_weights(0), model.linears[0].weight, state.keys,
                                    state.values, 0, model.config.norm_eps, persistent=False, phase_ends=ends)



def frame_by_steps(lm, steps, hidden, text_token, state, projections, sampling, targets, provided):
    """The frame's steps one launch each (the fused step), each step's token drawn by the
    sampling kernel and the given token forced where provided: what the frame kernel fuses."""
    fast = Kernels(fused_depformer_max_rows=1 << 30, sampling=True)
    previous, tokens, logits = text_token, [], []
    for step in range(steps):
        step_logits = lm.depformer_step(step, hidden, previous, state, fast, projections)
        token = sample_tokens(step_logits, *sampling, fast)
        logits.append(step_logits)
        tokens.append(token)
        previous = torch.where(provided[:, step], targets[:, step], token)
    return torch.stack(tokens, 1), torch.stack(logits)


@pytest.mark.parametrize(("rows", "dtype", "weights"), [(2, torch.float32, "plain"), (5, torch.float32, "fp8"),
                                                     (1, torch.bfloat16, "plain")], ids=str)
def test_fused_frame_draws_the_tokens_of_the_fused_steps_and_their_sampler(rows, dtype, weights):
    """A frame's steps in one launch with their draws in it: the same logits, tokens and caches
    as the fused step launched step by step with the sampling kernel after each (greedy and
    sampled rows, top-k of 1 and past the card, a given token forced into the next step, a
    given -1 embedding to zero; 5 rows: on the tensor cores). In float32, bit for bit. In bf16
    the interpreter rounds the kernel's sum of a step's inputs otherwise than PyTorch's add
    does (on CUDA both round to nearest even: the GPU test compares bf16 bit for bit), so here
    every step's token is given and the logits agree to bf16's precision."""
    interpreter_or_skip("cpu")
    from personaplex.runtime.sampling import RowNoise

    model = random_lm(tiny_lm_config(card=80)).to(dtype)
    if weights == "fp8":
        model = quantize_model(model, "fp8")
    steps = 5
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 1, model.config.dim, generator=gen).to(dtype)
    text_token = torch.randint(0, model.config.text_card, (rows,), generator=gen)
    projections = model.depformer_projections(hidden)
    temperature = torch.tensor([0.8, 0.0, 1.3] * 2)[:rows]
    top_k = torch.tensor([250, 5, 1] * 2)[:rows]
    targets = torch.randint(0, model.config.card, (rows, steps + 3), generator=gen)[:, 1:]  # rows apart: strided
    provided = torch.zeros(rows, steps + 2, dtype=torch.bool)
    provided[0, 1] = True
    provided[-1, 2] = True
    targets[-1, 2] = -1
    exact = dtype == torch.float32
    if not exact:
        provided[:] = True
    noise, frame_noise = RowNoise(rows, "cpu"), RowNoise(rows, "cpu")
    noise.reseed(slice(None), 11)
    frame_noise.reseed(slice(None), 11)
    assert model.depformer_frame_fusable(steps, hidden, Kernels(fused_depformer_max_rows=rows, sampling=True))
    step_state, frame_state = model.new_depformer_state(rows), model.new_depformer_state(rows)
    expected_tokens, expected_logits = frame_by_steps(model, steps, hidden, text_token, step_state, projections,
                                                      (temperature, top_k, noise), targets, provided)
    tokens, logits = model.fused_depformer_frame(steps, hidden, text_token, frame_state, projections, temperature,
                                                 top_k, frame_noise.next_keys(steps), targets, provided)
    assert torch.equal(frame_noise.draws, noise.draws)
    if exact:
        assert torch.equal(logits, expected_logits) and torch.equal(tokens, expected_tokens)
        assert torch.equal(frame_state.keys, step_state.keys) and torch.equal(frame_state.values, step_state.values)
    else:
        for got, want in ((logits, expected_logits), (frame_state.keys, step_state.keys)):
            assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2
