"""The k-th largest probability of top-k sampling (`model/kernels/top_k.py`) against sorting,
in Triton's interpreter on the CPU: the same value exactly, whatever the row width, k and
ties; and the sampler taking it draws the same tokens as the sampler that sorts. On CUDA:
tests/gpu/test_top_k.py."""

from __future__ import annotations

import pytest
import torch

from personaplex.model.kernels import cuda_op
from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.runtime.sampling import RowNoise, kth_largest_probability, sample_tokens
from tests.gpu.common import interpreter_or_skip

KERNEL = Kernels(kth_largest=True)


def probabilities(rows: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(rows, width, generator=gen), dim=-1)
    probs[0, : min(3, width)] = probs[0, min(3, width) - 1]  # a tie at the top
    probs[-1, width // 2:] = 0.0  # underflowed candidates
    return probs


@pytest.mark.parametrize("width", [1, 7, 2048, 32000])
def test_kth_largest_is_the_sorted_rows_kth_value(width):
    interpreter_or_skip("cpu")
    probs = probabilities(6, width, width)
    top_k = torch.tensor([1, 2, 3, width, width + 9, 250])
    expected = kth_largest_probability(probs, top_k, READABLE_KERNELS)
    assert torch.equal(kth_largest_probability(probs, top_k, KERNEL), expected)
    assert torch.equal(cuda_op("kth_largest")(probs, top_k), expected)


def test_kth_largest_refuses_what_it_cannot_hold():
    interpreter_or_skip("cpu")
    with pytest.raises(ValueError, match="float32 rows"):
        cuda_op("kth_largest")(torch.rand(2, 8, dtype=torch.float64), torch.tensor([1, 2]))


def test_the_sampler_draws_the_same_tokens_either_way():
    interpreter_or_skip("cpu")
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(4, 2048, generator=gen)
    temperature = torch.tensor([0.8, 0.0, 1.2, 0.7])
    top_k = torch.tensor([250, 250, 1, 2048])
    sorted_noise, kernel_noise = RowNoise(4, "cpu"), RowNoise(4, "cpu")
    for noise in (sorted_noise, kernel_noise):
        noise.reseed(slice(None), 1234)
    for _ in range(5):
        readable = sample_tokens(logits, temperature, top_k, sorted_noise)
        fast = sample_tokens(logits, temperature, top_k, kernel_noise, KERNEL)
        assert torch.equal(readable, fast)
    # top_k 1 is the argmax, like temperature 0.
    assert readable[2] == logits[2].argmax() and readable[1] == logits[1].argmax()
