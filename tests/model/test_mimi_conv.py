"""Mimi's streaming convolutions run as matrix products (`Kernels.conv_products`) compute what
cuDNN's convolutions (the readable path, `F.conv1d` / `F.conv_transpose1d`) compute, chunk after
chunk of a stream, and only where the products are meant to run."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.model.mimi import conv as conv_module
from personaplex.model.mimi.conv import StreamingConv1d, StreamingConvTranspose1d
from tests.gpu.common import GemvRows, interpreter_or_skip

PRODUCTS = Kernels(conv_products=True)
CHUNKS = 4


class OpNames(TorchDispatchMode):
    """The ATen ops a block of code runs."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__)
        return func(*args, **(kwargs or {}))


def random_conv(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module.requires_grad_(False)


def stream(module, chunks: list[torch.Tensor], kernels: Kernels, **extra) -> torch.Tensor:
    state = module.new_state(chunks[0].shape[0], torch.device("cpu"), torch.float32)
    if isinstance(module, StreamingConv1d):
        fresh = torch.ones(chunks[0].shape[0], dtype=torch.bool)
        outputs = []
        for chunk in chunks:
            outputs.append(module(chunk, state, fresh, kernels=kernels))
            fresh = torch.zeros_like(fresh)
        return torch.cat(outputs, dim=-1)
    return torch.cat([module(chunk, state, kernels) for chunk in chunks], dim=-1)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a - b).norm() / b.norm()) < 1e-5)


@pytest.mark.parametrize("in_channels, out_channels, kernel, stride, dilation, bias, replicate", [
    (1, 8, 7, 1, 1, True, False),  # the first conv: one input channel
    (8, 4, 3, 1, 2, True, False),  # a residual block's conv, dilated
    (4, 8, 1, 1, 1, True, False),  # 1x1 (no carried context)
    (8, 16, 8, 4, 1, True, False),  # a strided downsampling conv
    (16, 16, 4, 2, 1, False, True),  # Mimi's 25 -> 12.5 Hz conv: no bias, replicate padding
])
def test_conv_as_a_product_equals_the_convolution(in_channels, out_channels, kernel, stride, dilation, bias, replicate):
    module = random_conv(StreamingConv1d(in_channels, out_channels, kernel, stride, dilation, bias=bias,
                                         replicate_pad=replicate), seed=kernel)
    chunks = list(torch.randn(2, in_channels, CHUNKS * 8 * stride).chunk(CHUNKS, dim=-1))
    with OpNames() as ops:
        products = stream(module, chunks, PRODUCTS)
    assert not any("convolution" in name for name in ops.names)
    assert close(products, stream(module, chunks, READABLE_KERNELS))


@pytest.mark.parametrize("in_channels, out_channels, kernel, stride, groups", [
    (16, 8, 8, 4, 1),  # a decoder's upsampling conv (kernel = 2 x stride)
    (8, 4, 5, 2, 1),  # a kernel that is not a multiple of the stride: three runs, the last padded
    (16, 16, 4, 2, 16),  # Mimi's 12.5 -> 25 Hz conv: depthwise
])
def test_transposed_conv_as_a_product_equals_the_convolution(in_channels, out_channels, kernel, stride, groups):
    module = random_conv(StreamingConvTranspose1d(in_channels, out_channels, kernel, stride, groups=groups,
                                                  bias=groups == 1), seed=kernel)
    chunks = list(torch.randn(2, in_channels, CHUNKS * 3).chunk(CHUNKS, dim=-1))
    with OpNames() as ops:
        products = stream(module, chunks, PRODUCTS)
    assert not any("convolution" in name for name in ops.names)
    assert close(products, stream(module, chunks, READABLE_KERNELS))


def test_grouped_and_large_convolutions_stay_convolutions(monkeypatch):
    grouped = random_conv(StreamingConvTranspose1d(8, 8, 4, 2, groups=2), seed=1)
    chunks = list(torch.randn(1, 8, 4).chunk(2, dim=-1))
    with OpNames() as ops:
        stream(grouped, chunks, PRODUCTS)
    assert any("convolution" in name for name in ops.names)

    monkeypatch.setattr(conv_module, "CONV_PRODUCT_MAX_FLOPS", 0)
    plain = random_conv(StreamingConv1d(4, 4, 3), seed=2)
    with OpNames() as ops:
        stream(plain, list(torch.randn(1, 4, 8).chunk(2, dim=-1)), PRODUCTS)
    assert any("convolution" in name for name in ops.names)


def test_one_or_two_output_samples_take_the_gemv():
    """At one or two rows of columns the product is the GEMV's (Triton's interpreter here)."""
    interpreter_or_skip("cpu")
    module = random_conv(StreamingConv1d(16, 32, 8, 4), seed=3)
    chunks = list(torch.randn(1, 16, CHUNKS * 8).chunk(CHUNKS, dim=-1))
    with GemvRows() as gemv:
        products = stream(module, chunks, Kernels(conv_products=True, gemv=True))
    assert gemv.rows == [2] * CHUNKS
    assert close(products, stream(module, chunks, READABLE_KERNELS))
