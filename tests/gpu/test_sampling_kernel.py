"""Top-k sampling in one launch (`kernels/sampling.py`) on CUDA against the readable sampler,
at the frame's widths (2048 audio candidates, 32000 text ones), in the model's bf16 and in
float32, and batch sizes up to a full server's 150 rows; and the sampler compiled whole as the
frame compiles it. The CPU side runs in tests/model/test_sampling_kernel.py."""

from __future__ import annotations

import pytest
import torch

from personaplex.model.kernels import register_cuda_ops
from personaplex.model.layers import Kernels
from personaplex.runtime.sampling import RowNoise, sample_tokens
from tests.gpu.common import GPU_ONLY

pytestmark = list(GPU_ONLY)
KERNEL = Kernels(sampling=True)


def row_settings(rows: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    temperature = 0.1 + 1.5 * torch.rand(rows, device="cuda", generator=gen)
    temperature[1 % rows] = 0.0
    top_k = torch.randint(1, width + 10, (rows,), device="cuda", generator=gen)
    top_k[0] = 250
    return temperature, top_k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [2048, 32000])
@pytest.mark.parametrize("rows", [1, 32, 150])
def test_kernel_draws_the_readable_samplers_tokens(rows, width, dtype):
    gen = torch.Generator(device="cuda").manual_seed(rows + width)
    logits = (4 * torch.randn(rows, width, device="cuda", generator=gen)).to(dtype)
    temperature, top_k = row_settings(rows, width, gen)
    readable_noise, kernel_noise = RowNoise(rows, "cuda"), RowNoise(rows, "cuda")
    for noise in (readable_noise, kernel_noise):
        noise.reseed(slice(None), width)
    for _ in range(3):
        expected = sample_tokens(logits, temperature, top_k, readable_noise)
        assert torch.equal(sample_tokens(logits, temperature, top_k, kernel_noise, KERNEL), expected)


def test_the_compiled_sampler_draws_the_same_tokens_either_way():
    register_cuda_ops()  # before compiling, as the frame runner does
    rows, width = 8, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = 4 * torch.randn(rows, width, device="cuda", generator=gen, dtype=torch.bfloat16)
    temperature, top_k = row_settings(rows, width, gen)
    readable_noise, kernel_noise = RowNoise(rows, "cuda"), RowNoise(rows, "cuda")
    for noise in (readable_noise, kernel_noise):
        noise.reseed(slice(None), 99)
    compiled = torch.compile(lambda: sample_tokens(logits, temperature, top_k, kernel_noise, KERNEL), fullgraph=True)
    for _ in range(4):
        assert torch.equal(compiled(), sample_tokens(logits, temperature, top_k, readable_noise))
