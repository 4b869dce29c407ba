"""Weight formats on a tiny LM (CPU): error bounds against the float model, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from personaplex.model.config import LMConfig
from personaplex.model.lm import LMModel
from personaplex.model.quantize import (
    Fp8Linear,
    Int4Linear,
    Int8Linear,
    dequantize_affine,
    pack_codes,
    quantize_affine,
    quantize_model,
    unpack_codes,
)


def quant_config() -> LMConfig:
    """Tiny, with every linear input size a multiple of 128 so that all group sizes apply."""
    return LMConfig(
        dim=128, num_heads=4, num_layers=2, hidden_scale=3.0, card=64, text_card=256, context=16,
        depformer_dim=128, depformer_num_heads=4, depformer_num_layers=2, depformer_dim_feedforward=384,
    )


def random_model(seed: int = 0) -> LMModel:
    torch.manual_seed(seed)
    return LMModel(quant_config()).eval().requires_grad_(False)


def random_codes(config: LMConfig, frames: int = 12, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(0, config.card, (batch, config.num_codebooks, frames), generator=generator)
    codes[:, 0] = torch.randint(0, config.text_card, (batch, frames), generator=generator)
    return codes


def logit_stats(model: nn.Module, reference: tuple[torch.Tensor, torch.Tensor], codes: torch.Tensor) -> dict[str, float]:
    """Relative logit error and greedy (argmax) agreement, for the text and the audio heads."""
    stats = {}
    for label, out, ref in zip(("text", "audio"), model(codes), reference):
        known = torch.isfinite(ref[..., 0])  # the delayed tail is NaN by design
        out, ref = out.float()[known], ref.float()[known]
        stats[f"{label}_err"] = ((out - ref).norm() / ref.norm()).item()
        stats[f"{label}_agree"] = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return stats


# --------------------------------------------------------------------------- packing and the affine format


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_round_trip_and_nibble_order(bits: int) -> None:
    codes = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)
    if bits == 4:  # value 2j in the low nibble of byte j, as in MLX's words
        assert torch.equal(packed[:, 0] & 0xF, codes[:, 0]) and torch.equal(packed[:, 0] >> 4, codes[:, 1])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_affine_error_is_at_most_half_a_step(bits: int, group_size: int) -> None:
    weight = torch.randn(48, 256) * 0.05
    packed, scales, biases = quantize_affine(weight, bits, group_size)
    restored = dequantize_affine(packed, scales, biases, bits, group_size, torch.float32)
    step = scales.float().repeat_interleave(group_size, dim=1)
    # Half a step, plus the fp16 rounding of the stored bias.
    assert ((restored - weight).abs() <= step / 2 + 1e-4).all()


def test_constant_groups_are_exact() -> None:
    weight = torch.full((4, 64), 0.25)
    weight[1] = -1.5
    packed, scales, biases = quantize_affine(weight, 4, 64)
    assert torch.equal(dequantize_affine(packed, scales, biases, 4, 64, torch.float32), weight)


def test_bad_group_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="group size"):
        Int4Linear(128, 8, group_size=48)
    model = LMModel(LMConfig(dim=64, num_heads=4, num_layers=1, hidden_scale=4.125, card=16, text_card=32,
                             depformer_dim=32, depformer_num_heads=4, depformer_num_layers=1,
                             depformer_dim_feedforward=132))
    with pytest.raises(ValueError, match="transformer.layers.0.gating.linear_out: .*176 is not a multiple"):
        quantize_model(model, "int4", group_size=64)


# --------------------------------------------------------------------------- whole model

# Bounds measured on this tiny random model (errors relative to the float32 model, seeds 0-2),
# with about 2x margin. text / audio logit error, lowest greedy agreement of the two heads:
#   bf16 (whole model in bf16)   7.2e-3 / 6.0e-3   0.980
#   int8 g64                     4e-4   / 2.3e-3   0.992
#   fp8 (per-row scales)         2.9e-3 / 1.6e-2   0.980
#   int4 g64                     7.6e-3 / 4.0e-2   0.947 (audio heads: 64-way, nearly flat here)
FORMAT_BOUNDS = {
    "bf16": (1.5e-2, 1.2e-2, 0.97),
    "int8": (1e-3, 5e-3, 0.98),
    "fp8": (6e-3, 3e-2, 0.97),
    "int4": (1.5e-2, 8e-2, 0.9),
}


@pytest.mark.parametrize("fmt", list(FORMAT_BOUNDS))
def test_format_error_against_float_model(fmt: str) -> None:
    model = random_model()
    codes = random_codes(model.config)
    reference = model(codes)
    if fmt == "bf16":
        model = model.to(torch.bfloat16)
    quantize_model(model, fmt, group_size=64)
    stats = logit_stats(model, reference, codes)
    text_bound, audio_bound, agreement = FORMAT_BOUNDS[fmt]
    assert stats["text_err"] < text_bound and stats["audio_err"] < audio_bound, stats
    assert stats["text_agree"] >= agreement and stats["audio_agree"] >= agreement, stats


def test_int4_error_grows_with_group_size() -> None:
    codes = random_codes(quant_config())
    reference = random_model()(codes)
    errors = []
    for group_size in (32, 64, 128):
        model = quantize_model(random_model(), "int4", group_size=group_size)
        errors.append(logit_stats(model, reference, codes)["audio_err"])
    assert errors[0] < errors[1] < errors[2] < 0.12, errors


def test_default_filter_keeps_the_heads_in_float() -> None:
    model = quantize_model(random_model(), "int4")
    assert type(model.text_linear) is nn.Linear
    assert all(type(head) is nn.Linear for head in model.linears)
    assert all(isinstance(m, Int4Linear) for m in model.depformer_in)
    layer = model.transformer.layers[0]
    assert isinstance(layer.self_attn.in_proj, Int4Linear) and isinstance(layer.gating.linear_out, Int4Linear)
    assert isinstance(model.depformer.layers[1].self_attn.out_projs[15], Int4Linear)
    assert not any(type(m) is nn.Linear for name, m in model.named_modules()
                   if name.startswith(("transformer.", "depformer.")))


def test_include_filter_and_device_argument() -> None:
    model = quantize_model(random_model(), "int8", include=lambda name: name == "text_linear", device="cpu")
    assert isinstance(model.text_linear, Int8Linear)
    assert type(model.transformer.layers[0].self_attn.in_proj) is nn.Linear


def test_fp8_codes_survive_a_dtype_cast() -> None:
    model = quantize_model(random_model(), "fp8")
    layer = model.transformer.layers[0].self_attn.in_proj
    assert isinstance(layer, Fp8Linear)
    bits_before = layer.weight_bits.clone()
    model.to(torch.bfloat16)
    assert layer.weight_bits.dtype == torch.uint8 and torch.equal(layer.weight_bits, bits_before)


# --------------------------------------------------------------------------- CUDA kernels (skipped on CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run on CUDA only")
@pytest.mark.parametrize("fmt", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
def test_cuda_kernel_matches_dequantized_weights(fmt: str, rows: int) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(1024, 384, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = quantize_model(nn.Sequential(linear), fmt, include=lambda name: True)[0]
    x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ layer.dequantized_weight().t()
    out = layer(x).float()
    assert ((out - expected).norm() / expected.norm()).item() < 1e-2


def test_tuned_launch_shapes_tile_their_layers_and_h200_shapes_come_first() -> None:
    """Every measured launch shape tiles its layer as it stands (fit_config changes nothing, so
    what was timed is what runs), and the several-row H200 entries win over the H100 table."""
    from personaplex.model.kernels import WeightKind
    from personaplex.model.kernels import quantized_matmul as qmm

    for (kind, bucket, n, k), shape in qmm._TUNED_DOT_H200.items():
        config = qmm.KernelConfig(*shape)
        group = 64 if kind == WeightKind.INT4 else 1
        assert qmm.fit_config(config, kind, k, group) == config
        assert qmm.default_config(kind, bucket, n, k) == config
        assert config.block_m >= min(bucket, 16)
    for (kind, n, k), shape in qmm._TUNED_GEMV_H200.items():
        config = qmm.KernelConfig(1, *shape)
        assert qmm.fit_config(config, kind, k, 64 if kind == WeightKind.INT4 else 1) == config
    assert qmm.default_config(WeightKind.INT8, 64, 4096, 11264) == qmm.KernelConfig(*qmm._TUNED_H100[(64, 4096, 11264)])


def test_int4_weights_off_a_word_boundary_are_refused() -> None:
    """The GEMV reads int4 codes as 32-bit words: a byte-offset view gets one clear line, not a
    misaligned read on the GPU (checked before any launch, so on the CPU too)."""
    from personaplex.model.kernels import WeightKind
    from personaplex.model.kernels.quantized_matmul import quantized_linear

    storage = torch.zeros(32 * 32 + 1, dtype=torch.uint8)
    shifted = storage[1:].view(32, 32)
    scales = torch.ones(32, 1, dtype=torch.float16)
    with pytest.raises(ValueError, match="4-byte boundary"):
        quantized_linear(torch.ones(1, 64), shifted, scales, scales, WeightKind.INT4, 64)
