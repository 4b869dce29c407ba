"""The k-th largest probability of top-k sampling (`kernels/top_k.py`) on CUDA against sorting,
at the frame's widths (2048 audio candidates, 32000 text ones) and batch sizes up to a full
server's 150 rows; and the sampler, compiled whole as the frame compiles it, drawing the same
tokens with the kernel as the readable sampler does by sorting. The CPU side runs in
tests/model/test_top_k.py."""

from __future__ import annotations

import pytest
import torch

from personaplex.model.kernels import register_cuda_ops
from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.runtime.sampling import RowNoise, kth_largest_probability, sample_tokens
from tests.gpu.common import GPU_ONLY

pytestmark = list(GPU_ONLY)
KERNEL = Kernels(kth_largest=True)


@pytest.mark.parametrize("width", [2048, 32000])
@pytest.mark.parametrize("rows", [1, 32, 150])
def test_kth_largest_is_the_sorted_rows_kth_value(rows, width):
    gen = torch.Generator(device="cuda").manual_seed(rows + width)
    probs = torch.softmax(3 * torch.randn(rows, width, device="cuda", generator=gen), dim=-1)
    top_k = torch.randint(1, width + 10, (rows,), device="cuda", generator=gen)
    top_k[0] = 250
    expected = kth_largest_probability(probs, top_k, READABLE_KERNELS)
    assert torch.equal(kth_largest_probability(probs, top_k, KERNEL), expected)


def test_the_compiled_sampler_draws_the_same_tokens_either_way():
    register_cuda_ops()  # before compiling, as the frame runner does
    rows, width = 8, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = 4 * torch.randn(rows, width, device="cuda", generator=gen, dtype=torch.bfloat16)
    temperature = torch.full((rows,), 0.8, device="cuda")
    temperature[1] = 0.0
    top_k = torch.tensor([250, 250, 1, 2048, 25, 3, 100, 7], device="cuda")
    sorted_noise, kernel_noise = RowNoise(rows, "cuda"), RowNoise(rows, "cuda")
    for noise in (sorted_noise, kernel_noise):
        noise.reseed(slice(None), 99)
    compiled = torch.compile(lambda: sample_tokens(logits, temperature, top_k, kernel_noise, KERNEL), fullgraph=True)
    for _ in range(4):
        assert torch.equal(compiled(), sample_tokens(logits, temperature, top_k, sorted_noise))
