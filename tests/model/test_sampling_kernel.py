"""Top-k sampling in one launch (`model/kernels/sampling.py`) against the readable sampler, in
Triton's interpreter on the CPU: the same tokens for the same noise keys, whatever the row
width, logits' dtype, k, temperature and ties. On CUDA: tests/gpu/test_sampling_kernel.py."""

from __future__ import annotations

import pytest
import torch

from personaplex.model.kernels import cuda_op
from personaplex.model.layers import Kernels
from personaplex.runtime.sampling import RowNoise, sample_tokens
from tests.gpu.common import interpreter_or_skip

KERNEL = Kernels(sampling=True)


def awkward_logits(rows: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Logits of both signs with ties: at the top of row 0, a flat tail in the last row, and
    -0.0 beside +0.0."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(rows, width, generator=gen)).to(dtype)
    logits[0, : min(3, width)] = logits[0].max()
    logits[-1, width // 2:] = -7.0
    if width > 4:
        logits[1, :2] = torch.tensor([-0.0, 0.0], dtype=dtype)
    return logits


def settings(rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    temperature = torch.tensor([0.8, 0.0, 1.3, 0.7, 0.05, 2.0])[:rows]
    top_k = torch.tensor([3, 250, 1, width, width + 9, 25])[:rows]
    return temperature, top_k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [1, 7, 2048, 32000])
def test_kernel_draws_the_readable_samplers_tokens(width, dtype):
    interpreter_or_skip("cpu")
    logits = awkward_logits(6, width, dtype, width)
    temperature, top_k = settings(6, width)
    readable_noise, kernel_noise = RowNoise(6, "cpu"), RowNoise(6, "cpu")
    for noise in (readable_noise, kernel_noise):
        noise.reseed(slice(None), width)
    for _ in range(3):
        expected = sample_tokens(logits, temperature, top_k, readable_noise)
        assert torch.equal(sample_tokens(logits, temperature, top_k, kernel_noise, KERNEL), expected)
    assert expected[1] == logits[1].float().argmax()  # temperature 0: the argmax
    assert expected[2] == logits[2].float().argmax()  # top-1: the argmax too


def test_kernel_keeps_only_the_top_k():
    """Many draws of a row with k = 4 land on its four largest logits, and on each of them."""
    interpreter_or_skip("cpu")
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.5, 2.0, -4.0, 2.75, 1.0]], dtype=torch.bfloat16)
    noise = RowNoise(1, "cpu")
    noise.reseed(slice(None), 3)
    drawn = {int(sample_tokens(logits, torch.tensor([5.0]), torch.tensor([4]), noise, KERNEL)) for _ in range(60)}
    assert drawn == {1, 3, 4, 6}


def test_kernel_refuses_what_it_cannot_hold():
    interpreter_or_skip("cpu")
    one = torch.ones(2)
    with pytest.raises(ValueError, match="bf16, float16 or float32"):
        cuda_op("sample_top_k")(torch.rand(2, 8, dtype=torch.float64), one, one.long(), one.long())
    with pytest.raises(ValueError, match="one temperature, top-k and noise key per row"):
        cuda_op("sample_top_k")(torch.rand(2, 8), torch.ones(3), one.long(), one.long())
