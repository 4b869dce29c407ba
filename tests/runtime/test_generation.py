"""Greedy generation against upstream moshi's LMGen, where it can express the case."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from personaplex.model.lm_checkpoint import load_lm
from personaplex.runtime.generation import FrameGenerator, StepInputs
from personaplex.runtime.sampling import RowNoise, SamplingConfig, gumbel_noise, sample_tokens
from tests.fixtures.tiny_lm import tiny_lm_config, write_tiny_lm
from tests.gpu.common import interpreter_or_skip  # before any kernel is defined: picks the interpreter on a CPU


def eight_step_state_dict(state: dict, depformer_dim: int) -> dict:
    """The first 8 depformer steps only: upstream's LMGen with dep_q=8 then runs exactly the
    agent codebooks while taking the user's codes as input, as PersonaPlex conversations do."""
    narrow = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if name.startswith("depformer.layers.") and name.endswith("in_proj_weight"):
            narrow[name] = tensor[: 8 * 3 * depformer_dim]
        elif name.startswith("depformer.layers.") and name.endswith("out_proj.weight"):
            narrow[name] = tensor[: 8 * depformer_dim]
        elif parts[0] in ("linears", "depformer_in") and int(parts[1]) >= 8:
            continue
        elif parts[0] == "depformer_emb" and int(parts[1]) >= 7:
            continue
        elif name.startswith("depformer.layers") and ".gating." in name and int(parts[4]) >= 8:
            continue
        else:
            narrow[name] = tensor
    return narrow


@pytest.mark.parametrize(
    "context, upstream_context, frames",
    [(64, 64, 16), (8, 7, 48)],
    ids=["before-the-ring-is-full", "past-the-wrap"],
)
def test_greedy_conversation_equals_upstream_lmgen(tmp_path, context, upstream_context, frames):
    """Our ring follows NVIDIA's: a live frame sees the last context - 1 frames, which is
    upstream's LMGen at context - 1 (48 frames at context 8: the ring wraps six times)."""
    moshi_lm = pytest.importorskip("moshi.models.lm")
    config = tiny_lm_config(context=context)
    path = tmp_path / "model.safetensors"
    write_tiny_lm(path, config, seed=5)
    ours = FrameGenerator(load_lm(path, config, dtype=torch.float32), 1, SamplingConfig(greedy=True))

    kwargs = {k: v for k, v in config.to_moshi_dict().items() if k not in ("causal", "depformer_causal")}
    reference_lm = moshi_lm.LMModel(**{**kwargs, "dep_q": 8, "context": upstream_context})
    missing, unexpected = reference_lm.load_state_dict(eight_step_state_dict(load_file(str(path)), config.depformer_dim), strict=False)
    assert not missing and not unexpected
    reference = moshi_lm.LMGen(reference_lm.eval(), use_sampling=False)

    user = torch.randint(0, config.card, (1, 8, frames), generator=torch.Generator().manual_seed(0))
    expected, produced = [], []
    with torch.no_grad(), reference.streaming(1):
        for t in range(frames):
            out = reference.step(user[:, :, t : t + 1])
            if out is not None:
                expected.append(out[0, :, 0])
        # The reference PersonaPlex generator spends its first step (offset 0) on start tokens.
        ours.begin(StepInputs(user=user[:, :, 0]))
        for t in range(1, frames):
            valid = bool(ours.valid()[0])
            tokens = ours.step(StepInputs(user=user[:, :, t]))
            if valid:
                produced.append(tokens[0])
    assert len(produced) == len(expected) - 1 >= frames - 4
    for index, (a, b) in enumerate(zip(produced, expected)):
        assert torch.equal(a, b), f"frame {index}: ours {a.tolist()} upstream {b.tolist()}"


def test_sampling_respects_top_k_temperature_and_greedy_rows():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    temperature = torch.tensor([0.0, 1.0, 1.0])
    top_k = torch.tensor([5, 1, 3])
    noise = RowNoise(3, "cpu")
    noise.reseed(slice(None), 0)
    top3 = set(logits[2].topk(3).indices.tolist())
    seen = set()
    for _ in range(50):
        tokens = sample_tokens(logits, temperature, top_k, noise=noise)
        seen.add(int(tokens[2]))
        assert tokens[0] == logits[0].argmax()
        assert tokens[1] == logits[1].argmax()  # top-1 sampling is greedy
        assert int(tokens[2]) in top3
    assert seen == top3  # the draws vary from call to call


def noise_with(seeds: list[int]) -> RowNoise:
    noise = RowNoise(len(seeds), "cpu")
    for row, seed in enumerate(seeds):
        noise.reseed(slice(row, row + 1), seed)
    return noise


def test_each_row_samples_from_its_own_seed():
    """A row's draws depend on its seed only, not on its position or its neighbours."""
    logits = torch.randn(1, 100).expand(3, -1)
    temperature, top_k = torch.ones(3), torch.full((3,), 50)
    batch = noise_with([7, 8, 7])
    alone = noise_with([7])
    for _ in range(20):
        together = sample_tokens(logits, temperature, top_k, batch)
        single = sample_tokens(logits[:1], temperature[:1], top_k[:1], alone)
        assert together[0] == together[2] == single[0]


def test_row_noise_is_gumbel():
    noise = noise_with([1, 2, 3, 4])
    samples = torch.cat([gumbel_noise(noise.next_keys(), 256).flatten() for _ in range(50)])
    euler_gamma, std = 0.5772, math.pi / math.sqrt(6)
    assert abs(float(samples.mean()) - euler_gamma) < 0.03 and abs(float(samples.std()) - std) < 0.04


def test_draws_follow_the_softmax_of_the_kept_logits():
    """The Gumbel-max draw samples softmax(logits / T) over the top k, as the reference's multinomial."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    temperature, top_k = torch.tensor([0.8]), torch.tensor([4])
    noise = noise_with([11])
    draws = torch.cat([sample_tokens(logits, temperature, top_k, noise) for _ in range(4000)])
    frequencies = torch.bincount(draws, minlength=6).float() / len(draws)
    expected = torch.softmax(logits[0, :4] / 0.8, dim=0)
    assert torch.all(frequencies[4:] == 0)
    assert torch.allclose(frequencies[:4], expected, atol=0.025), (frequencies, expected)


def test_next_keys_of_several_draws_are_those_draws_in_turn():
    one_by_one, at_once = noise_with([3, 9]), noise_with([3, 9])
    expected = torch.stack([one_by_one.next_keys() for _ in range(5)], dim=1)
    assert torch.equal(at_once.next_keys(5), expected) and torch.equal(at_once.draws, one_by_one.draws)


def test_a_fused_frame_generates_what_the_step_by_step_depformer_generates(tmp_path):
    """With the fused depformer and the sampling kernel, a one-row frame runs its depformer
    steps and their draws in one launch (`LMModel.fused_depformer_frame`): over frames of
    sampled and provided tokens, the same tokens as the step-by-step path, and an observer
    still sees every step's logits (Triton's interpreter, float32)."""
    from personaplex.model.layers import Kernels

    interpreter_or_skip("cpu")
    config = tiny_lm_config(card=80)
    path = tmp_path / "model.safetensors"
    write_tiny_lm(path, config, seed=3)
    lm = load_lm(path, config, dtype=torch.float32)
    fused = Kernels(fused_depformer_max_rows=1, sampling=True)
    assert lm.depformer_frame_fusable(8, torch.zeros(1, 1, config.dim), fused)

    class Recorder:
        def __init__(self):
            self.steps = []

        def on_temporal(self, hidden, text_logits):
            pass

        def on_audio_logits(self, step, logits):
            self.steps.append(step)

    generators = [FrameGenerator(lm, 1, SamplingConfig(), seed=21, kernels=kernels)
                  for kernels in (fused, Kernels(sampling=True))]
    generators[0].observer = Recorder()
    user = torch.randint(0, config.card, (1, 8, 3), generator=torch.Generator().manual_seed(2))
    for frame in range(3):
        inputs = StepInputs(user=user[:, :, frame], agent=user[:, :, frame] if frame == 2 else None)
        outputs = [generator.step(inputs) for generator in generators]
        assert torch.equal(outputs[0], outputs[1])
    assert generators[0].observer.steps == list(range(8)) * 3
    assert torch.equal(generators[0].noise.draws, generators[1].noise.draws)
