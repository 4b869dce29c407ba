"""The temporal transformer's pre-norm residual blocks (x + f(norm(x))) with their norms and
residuals taken into the products (`layers.linear`, the GEMV at one or two rows) against the
readable blocks, on the CPU: the kernels in Triton's interpreter, a tiny LM streamed over a few
frames, so that each frame's keys and values came from fused blocks too. On the GPU the graphed
frame against the readable one covers the same code (tests/gpu/test_fast_path.py)."""

from __future__ import annotations

import pytest
import torch

from personaplex.model.layers import READABLE_KERNELS, Kernels, RMSNorm
from personaplex.model.quantize import quantize_model
from tests.fixtures.tiny_lm import random_lm, tiny_lm_config
from tests.gpu.common import GemvRows, interpreter_or_skip

FRAMES = 4
GEMV = Kernels(gemv=True)


def streamed_hidden(lm, kernels: Kernels, embeddings: torch.Tensor) -> torch.Tensor:
    """The temporal transformer's output for each frame, fed one frame at a time."""
    state = lm.new_temporal_state(embeddings.shape[0])
    return torch.cat([lm.transformer(embeddings[:, [t]], state, kernels) for t in range(embeddings.shape[1])], 1)


@pytest.mark.parametrize("weights", ["float32", "fp8"])
@pytest.mark.parametrize("rows", [1, 2])
def test_temporal_blocks_with_their_norms_and_residuals_in_the_products(weights, rows):
    """Each layer's four products take its two norms (in the qkv and the gated product) and its
    two residuals (in the out and the down product): four GEMV launches a layer, no RMSNorm module
    run, the readable frames' outputs within float32 rounding (fp8: the same weights both ways)."""
    interpreter_or_skip("cpu")
    lm = random_lm(tiny_lm_config())
    if weights == "fp8":
        quantize_model(lm, "fp8")
    embeddings = torch.randn(rows, FRAMES, lm.config.dim, generator=torch.Generator().manual_seed(rows))
    expected = streamed_hidden(lm, READABLE_KERNELS, embeddings)
    norms_run = []
    hooks = [module.register_forward_hook(lambda *_: norms_run.append(1))
             for module in lm.transformer.modules() if isinstance(module, RMSNorm)]
    with GemvRows() as gemv:
        fused = streamed_hidden(lm, GEMV, embeddings)
    for hook in hooks:
        hook.remove()
    assert not norms_run
    assert gemv.rows == [rows] * 4 * lm.config.num_layers * FRAMES
    assert float((fused - expected).norm() / expected.norm()) < 1e-5


def test_more_rows_than_the_gemv_takes_run_the_readable_blocks():
    """Three rows are past the GEMV: the norms run as modules, the products and sums as written."""
    lm = random_lm(tiny_lm_config())
    embeddings = torch.randn(3, 1, lm.config.dim)
    norms_run = []
    hooks = [module.register_forward_hook(lambda *_: norms_run.append(1))
             for module in lm.transformer.modules() if isinstance(module, RMSNorm)]
    fused = streamed_hidden(lm, GEMV, embeddings)
    for hook in hooks:
        hook.remove()
    assert len(norms_run) == 2 * lm.config.num_layers
    torch.testing.assert_close(fused, streamed_hidden(lm, READABLE_KERNELS, embeddings), rtol=0, atol=0)
