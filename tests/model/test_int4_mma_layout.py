"""The int4 tensor-core kernel's weight layout (`kernels/int4_mma.py`), checked on the CPU: the
kernel itself runs on the GPU only (tests/gpu/test_quantized.py)."""

from __future__ import annotations

import pytest
import torch

from personaplex.model.kernels.int4_mma import (
    MmaConfig,
    fits,
    from_fragment_order,
    interleave_halves,
    kernel_source,
    launch_config,
    separate_halves,
    to_fragment_order,
)


def random_layer(n: int, k: int, group: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    scales = torch.rand(n, k // group, generator=generator).half()
    biases = torch.randn(n, k // group, generator=generator).half()
    return codes, scales, biases


@pytest.mark.parametrize("group", [32, 64, 128])
def test_fragment_order_round_trips(group: int) -> None:
    codes, scales, biases = random_layer(48, 256, group)
    words, scale_bias = to_fragment_order(codes, scales, biases)
    assert words.shape == (48, 256 // 8) and words.dtype == torch.int32
    assert scale_bias.shape == (48, 2 * 256 // group) and scale_bias.dtype == torch.float16
    back_codes, back_scales, back_biases = from_fragment_order(words, scale_bias)
    assert torch.equal(back_codes, codes) and torch.equal(back_scales, scales) and torch.equal(back_biases, biases)


def test_gated_layer_puts_each_strips_gates_beside_their_values() -> None:
    """A gated layer's rows [a; b]: each 16-row strip holds 8 rows of a then the same 8 of b, so
    that the lane summing a's row g sums its value's too (row g + 8); the order round-trips."""
    codes, scales, biases = random_layer(48, 128, 64)
    rows = torch.arange(48)
    expected = torch.cat([torch.cat([rows[8 * i:8 * i + 8], 24 + rows[8 * i:8 * i + 8]]) for i in range(3)])
    assert torch.equal(interleave_halves(rows), expected)
    assert torch.equal(separate_halves(interleave_halves(codes)), codes)
    words, scale_bias = to_fragment_order(codes, scales, biases, gated=True)
    assert torch.equal(words, to_fragment_order(interleave_halves(codes), interleave_halves(scales),
                                                interleave_halves(biases))[0])
    back = from_fragment_order(words, scale_bias, gated=True)
    assert all(torch.equal(got, want) for got, want in zip(back, (codes, scales, biases)))


def test_gated_launch_adds_up_a_split_k_where_the_gate_sees_whole_sums() -> None:
    """The gate needs whole sums: a split K added up by atomic adds goes to the cluster (Hopper),
    or is not split without clusters; plain products keep the table's choice."""
    atomic = MmaConfig(split_k=4, cluster_sums=False)
    assert launch_config(64, 5632, 1024, (9, 0), atomic) == atomic
    assert launch_config(64, 5632, 1024, (9, 0), atomic, gated=True) == MmaConfig(split_k=4, cluster_sums=True)
    assert launch_config(64, 5632, 1024, (8, 0), atomic, gated=True).split_k == 1
    assert launch_config(64, 5632, 1024, (8, 0), MmaConfig(split_k=4)).cluster_sums is False
    assert "#define GATED 1" in kernel_source(1, MmaConfig(), 64, gated=True)
    assert "#define GATED 0" in kernel_source(1, MmaConfig(), 64)


def test_each_code_sits_where_the_mma_fragment_reads_it() -> None:
    """The documented place of every code, from mma.m16n8k16's A fragment (PTX ISA): lane
    4g + t holds rows g, g + 8 and inputs 2t, 2t + 1, 2t + 8, 2t + 9 of each 16 x 16 tile, in
    registers a0a1 (row g), a2a3 (row g + 8), a4a5 (row g, inputs + 8), a6a7; register j
    takes codes j and j + 4 of the lane's word."""
    n, k = 32, 128
    codes, scales, biases = random_layer(n, k, 64)
    words = to_fragment_order(codes, scales, biases)[0].flatten()  # [strip][chunk][lane][step]
    chunks = k // 64
    for row in range(n):
        for col in range(k):
            strip, r = divmod(row, 16)
            chunk, within = divmod(col, 64)
            step, c = divmod(within, 16)
            g, t = r % 8, (c % 8) // 2
            register = r // 8 + 2 * (c // 8)
            code = register + 4 * (c % 2)
            word = int(words[((strip * chunks + chunk) * 32 + 4 * g + t) * 4 + step])
            assert (word >> (4 * code)) & 0xF == codes[row, col], (row, col)


def test_scales_sit_with_their_lanes() -> None:
    codes, scales, biases = random_layer(32, 256, 64)
    scale_bias = to_fragment_order(codes, scales, biases)[1].reshape(2, 4, 8, 4)  # strip, group, g, 4
    for row in range(32):
        strip, r = divmod(row, 16)
        for group in range(4):
            entry = scale_bias[strip, group, r % 8]
            assert entry[2 * (r // 8)] == scales[row, group] and entry[2 * (r // 8) + 1] == biases[row, group]


def test_shapes_outside_the_layout_are_refused() -> None:
    assert fits(4096, 11264) and fits(1024, 2816) and not fits(4100, 4096) and not fits(4096, 4000)
    codes, scales, biases = random_layer(24, 128, 32)
    with pytest.raises(ValueError, match="N % 16"):
        to_fragment_order(codes, scales, biases)


def test_source_names_every_constant() -> None:
    source = kernel_source(4, MmaConfig(warps_n=2, warps_k=2, strips=1, stages=3, split_k=2, dequantize=True), 32)
    for line in ("#define M_TILES 4", "#define WARPS_K 2", "#define GROUP 32", "#define SPLIT 2", "#define STAGES 3",
                 "#define DEQUANTIZE 1"):
        assert line in source
    assert "#define DEQUANTIZE 0" in kernel_source(1, MmaConfig(), 64)


def test_split_of_k_halved_until_its_slices_are_whole_chunks() -> None:
    from personaplex.model.kernels.int4_mma import fit_split_k

    assert fit_split_k(MmaConfig(split_k=8), 11264).split_k == 8  # 1408 inputs a slice: 22 chunks
    assert fit_split_k(MmaConfig(split_k=8), 2816).split_k == 4  # 352 would not be whole chunks; 704 are
    assert fit_split_k(MmaConfig(split_k=8), 64).split_k == 1


def test_cluster_sums_only_where_the_gpu_has_clusters() -> None:
    from personaplex.model.kernels.int4_mma import for_capability

    config = MmaConfig(split_k=8, cluster_sums=True)
    assert for_capability(config, (9, 0)) == config  # Hopper: thread-block clusters
    assert not for_capability(config, (8, 6)).cluster_sums  # Ampere: atomic adds
    source = kernel_source(1, for_capability(config, (8, 0)), 64)
    assert "#define CLUSTER_SUMS 0" in source and "#define SPLIT 8" in source


def test_tensor_core_layer_holds_the_same_weights() -> None:
    from torch import nn

    from personaplex.model.quantize import Int4Linear, Int4TensorCoreLinear

    linear = nn.Linear(256, 32, bias=False)
    layer = Int4Linear.from_weight(linear.weight.detach(), 64)
    rearranged = Int4TensorCoreLinear(layer)
    assert rearranged.words.numel() * 4 == layer.qweight.numel()  # the same bytes, another order
    assert torch.equal(rearranged.dequantized_weight(), layer.dequantized_weight())
    x = torch.randn(3, 256)
    assert torch.equal(rearranged(x), layer(x))  # on the CPU: float math on the dequantized weights
    gated = Int4TensorCoreLinear(layer, halves_interleaved=True)
    assert torch.equal(gated.dequantized_weight(), layer.dequantized_weight()) and torch.equal(gated(x), layer(x))


def test_layers_stay_in_mlx_order_where_the_kernel_cannot_run() -> None:
    from personaplex.model.config import LMConfig
    from personaplex.model.lm import LMModel
    from personaplex.model.quantize import Int4Linear, quantize_model, use_int4_tensor_cores

    config = LMConfig(dim=128, num_heads=1, num_layers=1, hidden_scale=4.5, dep_q=2, text_card=64, depformer_dim=128,
                      depformer_num_heads=1, depformer_num_layers=1, depformer_dim_feedforward=576)
    lm = quantize_model(LMModel(config), "int4")
    assert use_int4_tensor_cores(lm) == 0  # the CPU
    assert isinstance(lm.transformer.layers[0].self_attn.in_proj, Int4Linear)
