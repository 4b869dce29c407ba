"""The fused depformer step (`kernels/fused_depformer.py`) on CUDA at PersonaPlex's depformer
shape (random bf16 weights, and fp8 ones): the persistent kernel (one launch, grid barriers) against the
same phases launched one by one and against the readable `depformer_step`, over the 8 agent
steps of a frame; then inside a CUDA graph replayed twice (the barrier's counter must start
from zero on every replay) and inside torch.compile. The CPU side runs in
tests/model/test_fused_depformer.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from personaplex.model.config import LMConfig
from personaplex.model.kernels import register_cuda_ops
from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.model.lm import LMModel
from personaplex.model.quantize import quantize_model
from personaplex.model.random_init import build_random_lm
from tests.gpu.common import GPU_ONLY

pytestmark = list(GPU_ONLY)
FUSED = Kernels(fused_depformer_max_rows=1 << 30)
STEPS = 8


@pytest.fixture(scope="module")
def lm() -> LMModel:
    """The full depformer behind a one-layer temporal transformer (never run here)."""
    return build_random_lm(dataclasses.replace(LMConfig(dep_q=STEPS), num_layers=1), "cuda", kind="trained-like")


@pytest.fixture(scope="module")
def fp8_lm() -> LMModel:
    """The same with fp8 weights (codes and row scales; the logits heads stay bf16)."""
    model = build_random_lm(dataclasses.replace(LMConfig(dep_q=STEPS), num_layers=1), "cuda", kind="trained-like")
    return quantize_model(model, "fp8")


@pytest.fixture(params=["bf16", "fp8"])
def any_lm(request, lm, fp8_lm) -> LMModel:
    return lm if request.param == "bf16" else fp8_lm


def frame_inputs(lm: LMModel, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A frame's normed temporal output [B, 1, dim] and the tokens fed to steps 0..7 [B, 8]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(rows, 1, lm.config.dim, device="cuda", generator=gen).to(torch.bfloat16)
    tokens = torch.randint(0, lm.config.card, (rows, STEPS), device="cuda", generator=gen)
    return hidden, tokens


def run_steps(lm: LMModel, hidden: torch.Tensor, tokens: torch.Tensor, state, kernels: Kernels) -> torch.Tensor:
    return torch.stack([lm.depformer_step(k, hidden, tokens[:, k], state, kernels) for k in range(STEPS)], dim=1)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_persistent_kernel_matches_per_phase_launches_and_readable_steps(any_lm, rows):
    from personaplex.model.kernels.fused_depformer import launch_fused_depformer_step

    lm = any_lm

    hidden, tokens = frame_inputs(lm, rows, seed=rows)
    readable_state = lm.new_depformer_state(rows)
    expected = run_steps(lm, hidden, tokens, readable_state, READABLE_KERNELS)
    fused_state = lm.new_depformer_state(rows)
    fused = run_steps(lm, hidden, tokens, fused_state, FUSED)
    assert relative_error(fused, expected) < 2e-2
    # The caches are what the next steps read: the same keys and values as the readable path's.
    assert relative_error(fused_state.keys, readable_state.keys) < 2e-2
    assert relative_error(fused_state.values, readable_state.values) < 2e-2

    # Step by step from the same state, the persistent kernel and one launch per phase run the
    # same phase code: they differ by nothing but the compiler's instruction choices.
    per_phase_state = dataclasses.replace(fused_state, keys=fused_state.keys.clone(), values=fused_state.values.clone())
    for step in range(STEPS):
        x = lm.depformer_input(step, hidden, tokens[:, step])[:, 0]
        args = (x, lm.depformer_step_weights(step), lm.linears[step].weight)
        scales = lm.depformer_step_scales(step)
        persistent = launch_fused_depformer_step(*args, fused_state.keys, fused_state.values, step, lm.config.norm_eps,
                                                 persistent=True, layer_scales=scales)
        per_phase = launch_fused_depformer_step(*args, per_phase_state.keys, per_phase_state.values, step,
                                                lm.config.norm_eps, persistent=False, layer_scales=scales)
        assert relative_error(persistent, per_phase) < 1e-3
    assert relative_error(fused_state.keys, per_phase_state.keys) < 1e-3


@pytest.mark.parametrize("rows", [1, 64])
def test_fused_steps_replay_in_a_cuda_graph(any_lm, rows):
    lm = any_lm
    hidden, tokens = frame_inputs(lm, rows, seed=100 + rows)
    state = lm.new_depformer_state(rows)
    static_hidden, static_tokens = hidden.clone(), tokens.clone()
    side = torch.cuda.Stream()  # warm up (Triton's compilation, the weight table) off the capture
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_steps(lm, static_hidden, static_tokens, state, FUSED)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = run_steps(lm, static_hidden, static_tokens, state, FUSED)
    for seed in (1, 2):  # two replays with new inputs: a counter left at its last value would hang or race
        hidden, tokens = frame_inputs(lm, rows, seed=seed)
        static_hidden.copy_(hidden)
        static_tokens.copy_(tokens)
        graph.replay()
        expected = run_steps(lm, hidden, tokens, lm.new_depformer_state(rows), READABLE_KERNELS)
        assert relative_error(graphed, expected) < 2e-2


def test_fused_step_compiles_whole(lm):
    """torch.compile(fullgraph) keeps the op opaque (its fake shape), as the frame runner needs."""
    register_cuda_ops()  # as the frame runner does before it compiles
    rows = 8
    hidden, tokens = frame_inputs(lm, rows, seed=7)
    compiled = torch.compile(lambda h, t, s: run_steps(lm, h, t, s, FUSED), fullgraph=True, dynamic=False)
    out = compiled(hidden, tokens, lm.new_depformer_state(rows))
    expected = run_steps(lm, hidden, tokens, lm.new_depformer_state(rows), READABLE_KERNELS)
    assert relative_error(out, expected) < 2e-2


@pytest.mark.parametrize("shape", [(8, 8192, 4, 4), (32, 32768, 8, 2), (32, 8192, 8, 2)], ids=str)
@pytest.mark.parametrize("rows", [1, 5, 24])
def test_launch_shapes_compute_the_same_steps(lm, shape, rows):
    """Several programs per SM behind one grid barrier, narrow and wide column tiles, on both
    sides of the CUDA-core / tensor-core switch: the readable steps' logits and caches."""
    from personaplex.model.kernels.fused_depformer import LaunchShape, launch_fused_depformer_step

    hidden, tokens = frame_inputs(lm, rows, seed=200 + rows)
    readable_state, fused_state = lm.new_depformer_state(rows), lm.new_depformer_state(rows)
    expected = run_steps(lm, hidden, tokens, readable_state, READABLE_KERNELS)
    fused = torch.stack([
        launch_fused_depformer_step(lm.depformer_input(k, hidden, tokens[:, k])[:, 0], lm.depformer_step_weights(k),
                                    lm.linears[k].weight, fused_state.keys, fused_state.values, k, lm.config.norm_eps,
                                    persistent=True, shape=LaunchShape(*shape))
        for k in range(STEPS)], dim=1)
    assert relative_error(fused, expected) < 2e-2
    assert relative_error(fused_state.keys, readable_state.keys) < 2e-2


def test_timed_steps_stamp_every_phase_and_compute_the_same(lm):
    """With phase_ends, each phase's earliest and latest end are stamped in order (a phase ends
    after the one before it, for its first program as for its last), and the logits are the
    untimed kernel's (a separate build: equal up to the compiler's freedom in ordering)."""
    from personaplex.model.kernels.fused_depformer import launch_fused_depformer_step, step_phases

    hidden, tokens = frame_inputs(lm, 1, seed=300)
    x = lm.depformer_input(0, hidden, tokens[:, 0])[:, 0]
    ends = torch.empty(2 * step_phases(1, lm.config.depformer_num_layers), dtype=torch.int64, device="cuda")
    arguments = (x, lm.depformer_step_weights(0), lm.linears[0].weight)
    untimed_state, timed_state = lm.new_depformer_state(1), lm.new_depformer_state(1)
    untimed = launch_fused_depformer_step(*arguments, untimed_state.keys, untimed_state.values, 0, lm.config.norm_eps,
                                          persistent=True)
    timed = launch_fused_depformer_step(*arguments, timed_state.keys, timed_state.values, 0, lm.config.norm_eps,
                                        persistent=True, phase_ends=ends)
    assert relative_error(timed, untimed) < 1e-3
    earliest, latest = ends.view(-1, 2).T.tolist()
    assert all(0 < first <= last for first, last in zip(earliest, latest))
    assert all(latest[p - 1] <= earliest[p] for p in range(1, len(latest)))



def frame_arguments(lm: LMModel, rows: int, seed: int):
    """A frame's depformer inputs: hidden, the text token, the projections, the rows' audio
    sampling (sampled and greedy rows), the given tokens (one forced, one -1)."""
    from personaplex.runtime.sampling import RowNoise

    hidden, tokens = frame_inputs(lm, rows, seed)
    text_token = tokens[:, 0] % lm.config.text_card
    projections = lm.depformer_projections(hidden)
    temperature = torch.tensor([0.8, 0.0, 1.2, 0.7] * 16, device="cuda")[:rows]
    top_k = torch.tensor([250, 250, 1, 40] * 16, device="cuda")[:rows]
    targets = torch.roll(tokens, 1, dims=1)
    provided = torch.zeros(rows, STEPS, dtype=torch.bool, device="cuda")
    provided[0, 2] = True
    provided[-1, 4] = True
    targets[-1, 4] = -1
    noise = RowNoise(rows, "cuda")
    noise.reseed(slice(None), seed)
    return hidden, text_token, projections, temperature, top_k, noise, targets, provided


def steps_then_draws(lm: LMModel, hidden, text_token, projections, temperature, top_k, noise, targets, provided, state):
    """The fused step launched step by step, the sampling kernel after each, the given tokens forced."""
    from personaplex.runtime.sampling import sample_tokens

    fast = Kernels(fused_depformer_max_rows=1 << 30, sampling=True)
    previous, tokens, logits = text_token, [], []
    for step in range(STEPS):
        logits.append(lm.depformer_step(step, hidden, previous, state, fast, projections))
        tokens.append(sample_tokens(logits[-1], temperature, top_k, noise, fast))
        previous = torch.where(provided[:, step], targets[:, step], tokens[-1])
    return torch.stack(tokens, 1), torch.stack(logits)


@pytest.mark.parametrize("rows", [1, 4, 9])
def test_fused_frame_draws_what_the_fused_steps_and_the_sampler_draw(any_lm, rows):
    """A frame's 8 steps and their draws in one launch (the persistent kernel): bit for bit the
    logits, tokens and caches of the fused step launched step by step with the sampling kernel
    after each; its per-phase launches the same."""
    from personaplex.model.kernels.fused_depformer import FrameSampling, launch_fused_depformer_frame

    lm = any_lm
    hidden, text_token, projections, temperature, top_k, noise, targets, provided = frame_arguments(lm, rows, 40)
    step_state, frame_state = lm.new_depformer_state(rows), lm.new_depformer_state(rows)
    frame_keys = noise.next_keys(STEPS)
    noise.draws -= STEPS
    expected_tokens, expected_logits = steps_then_draws(lm, hidden, text_token, projections, temperature, top_k, noise,
                                                        targets, provided, step_state)
    tokens, logits = lm.fused_depformer_frame(STEPS, hidden, text_token, frame_state, projections, temperature, top_k,
                                              frame_keys, targets, provided)
    assert torch.equal(logits, expected_logits) and torch.equal(tokens, expected_tokens)
    assert torch.equal(frame_state.keys, step_state.keys) and torch.equal(frame_state.values, step_state.values)
    assert (temperature[0] > 0 and len(set(tokens[0].tolist())) > 1)  # draws, not one repeated token

    per_phase_state = lm.new_depformer_state(rows)
    x = lm.depformer_input(0, hidden, text_token, projections=projections)[:, 0]
    weights = [w for step in range(STEPS) for w in lm.depformer_step_weights(step)]
    scales = [s for step in range(STEPS) for s in lm.depformer_step_scales(step)]
    embeddings = [lm.depformer_text_emb.weight, *(lm.depformer_emb[step].weight for step in range(STEPS - 1))]
    per_phase_tokens, per_phase_logits = launch_fused_depformer_frame(
        x, weights, [lm.linears[step].weight for step in range(STEPS)], embeddings, per_phase_state.keys,
        per_phase_state.values, lm.config.norm_eps,
        FrameSampling(projections, temperature, top_k, frame_keys, targets, provided), persistent=False,
        layer_scales=scales)
    assert relative_error(per_phase_logits, logits) < 1e-3
    assert (per_phase_tokens == tokens).float().mean() > 0.8  # the compiler may order sums otherwise


def test_fused_frame_replays_in_a_cuda_graph_and_compiles_whole(fp8_lm):
    """Captured in a CUDA graph (two replays, new inputs each) and inside torch.compile
    (fullgraph), the frame op draws what it draws eagerly."""
    lm = fp8_lm
    register_cuda_ops()
    rows = 1
    arguments = frame_arguments(lm, rows, 50)
    hidden, text_token, projections, temperature, top_k, noise, targets, provided = arguments

    def frame(hidden, text_token, projections, keys, state):
        return lm.fused_depformer_frame(STEPS, hidden, text_token, state, projections, temperature, top_k, keys,
                                        targets, provided)

    keys = noise.next_keys(STEPS)
    eager = frame(hidden, text_token, projections, keys, lm.new_depformer_state(rows))
    compiled = torch.compile(frame, fullgraph=True, dynamic=False)(hidden, text_token, projections, keys,
                                                                  lm.new_depformer_state(rows))
    assert all(torch.equal(got, want) for got, want in zip(compiled, eager))

    static = [t.clone() for t in (hidden, text_token, projections, keys)]
    state = lm.new_depformer_state(rows)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        frame(*static, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = frame(*static, state)
    for seed in (51, 52):
        hidden, text_token, projections, *_ = frame_arguments(lm, rows, seed)
        keys = noise.next_keys(STEPS)
        for target, value in zip(static, (hidden, text_token, projections, keys)):
            target.copy_(value)
        graph.replay()
        want = frame(hidden, text_token, projections, keys, lm.new_depformer_state(rows))
        assert all(torch.equal(got, expected) for got, expected in zip(graphed, want))
