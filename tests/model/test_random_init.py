"""The random LMs the quality measurements use, and the teacher-forced streaming helper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from personaplex.model.config import LMConfig
from personaplex.model.quantize import quantize_linear
from personaplex.model.random_init import (
    OUTLIER_GAIN,
    build_random_lm,
    compare_logits,
    fill_linear_,
    random_codes,
    teacher_forced_logits,
)


def small_config(**changes) -> LMConfig:
    base = dict(dim=256, num_heads=2, num_layers=2, dep_q=4, card=128, text_card=512, context=16,
                depformer_dim=128, depformer_num_heads=2, depformer_num_layers=2, depformer_dim_feedforward=576)
    return LMConfig(**{**base, **changes})


@pytest.mark.parametrize("context,forward_context", [(16, 16), (5, 4)])
def test_streamed_teacher_forcing_equals_the_whole_sequence_forward(context: int, forward_context: int) -> None:
    """Frame by frame through the KV ring and the depformer steps, aligned like `forward`.
    With a 5-frame context the ring (4 slots) wraps in 12 frames: streaming then sees the
    frames a whole-sequence forward with a context of 4 sees (NVIDIA's semantics)."""
    lm = build_random_lm(small_config(context=context), "cpu", torch.float32, "trained-like")
    same_window = build_random_lm(small_config(context=forward_context), "cpu", torch.float32, "trained-like")
    codes = random_codes(lm.config, 12, batch=2)
    forward = teacher_forced_logits(same_window, codes)
    streamed = teacher_forced_logits(lm, codes, streaming=True)
    for a, b in zip(streamed, forward):
        assert a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
    stats = compare_logits(streamed, forward)
    assert stats["text_worst"] < 1e-5 and stats["audio_worst"] < 1e-5, stats
    assert stats["text_agree"] == 1.0 and stats["audio_agree"] == 1.0


def test_weights_are_bf16_values_and_the_scales_are_a_trained_networks() -> None:
    lm = build_random_lm(small_config(num_layers=8), "cpu", torch.float32)
    for name, param in lm.named_parameters():
        assert torch.equal(param, param.to(torch.bfloat16).float()), name
    layer = lm.transformer.layers[3]
    # Unit-scale inputs to attention and FFN, residual writers scaled by 1/sqrt(2 * 8).
    assert layer.self_attn.in_proj.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert layer.gating.linear_out.weight.std().item() == pytest.approx(lm.config.hidden_dim**-0.5 / 4, rel=0.05)
    # Float32 and bf16 stay at the rounding floor: the network does not amplify it.
    codes = random_codes(lm.config, 12, batch=2)
    float32 = teacher_forced_logits(lm, codes)
    stats = compare_logits(teacher_forced_logits(lm.to(torch.bfloat16), codes), float32)
    assert stats["text_err"] < 2e-2 and stats["audio_err"] < 2e-2, stats


def test_trained_like_weights_have_row_scales_and_shared_outlier_columns() -> None:
    generator = torch.Generator().manual_seed(0)
    weights = [torch.empty(512, 1024) for _ in range(2)]
    for weight in weights:
        fill_linear_(weight, 1.0, "trained-like", generator)
    column_rms = [w.pow(2).mean(0).sqrt() for w in weights]
    outliers = [set(torch.nonzero(rms > OUTLIER_GAIN / 2).flatten().tolist()) for rms in column_rms]
    assert outliers[0] == outliers[1] and len(outliers[0]) == 2  # 0.2% of 1024, the same in both
    row_rms = weights[0].pow(2).mean(1).sqrt()
    assert row_rms.max() / row_rms.min() > 3  # log-normal rows, not one scale

    # Outlier columns are what int4's groups suffer from; fp8's per-row scale does not care.
    gaussian = torch.empty(512, 1024)
    fill_linear_(gaussian, 1.0, "gaussian", generator)

    def layer_error(weight: torch.Tensor, fmt: str) -> float:
        linear = nn.Linear(1024, 512, bias=False)
        linear.weight.data = weight
        restored = quantize_linear(linear, fmt, 64).dequantized_weight()
        return ((restored - weight).norm() / weight.norm()).item()

    assert layer_error(weights[0], "int4") > 1.1 * layer_error(gaussian, "int4")
    assert layer_error(weights[0], "fp8") == pytest.approx(layer_error(gaussian, "fp8"), rel=0.1)
