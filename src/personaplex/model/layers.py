"""Building blocks shared by the temporal transformer and the depformer.

Everything here is stateless: streaming state (KV caches, positions) is passed in
explicitly by the caller, so one set of weights can serve many conversations.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import GEMV_MAX_ROWS, KernelOperands, WeightKind, cuda_op, kernels_can_run


def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """x * alpha / sqrt(mean(x^2) + eps) in float32 (one fused kernel where PyTorch has one)."""
    return F.rms_norm(x.float(), alpha.shape[-1:], alpha.float().flatten(), eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the activation dtype (`rms_norm_f32` upstream)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        # Stored as [1, 1, dim] because that is the checkpoint's shape for `alpha`.
        self.alpha = nn.Parameter(torch.ones(1, 1, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.alpha, self.eps)


def rope_angles(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, D/2] of the RoPE angles for `positions` [B, T]: computed once per
    forward and shared by every layer (and by q and k). The ring-attention kernel takes them
    as they are: one pair of tables a forward, not one per layer.

    Angles are computed in float32 so that positions in the thousands keep their precision
    in bf16 runs.
    """
    angles = positions[:, :, None] * _inverse_frequencies(head_dim, max_period, positions.device)
    return torch.cos(angles), torch.sin(angles)


@functools.lru_cache(maxsize=16)
def _inverse_frequencies(head_dim: int, max_period: float, device: torch.device) -> torch.Tensor:
    """RoPE's per-pair frequencies [D/2] float32, made once per device: the three small
    kernels that make them would otherwise run in every forward (a frame has three)."""
    pair_index = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    return torch.exp(pair_index * (-math.log(max_period) * 2 / head_dim))


# The tables as one opaque op, for the forwards that share them between layers: compiled, a
# plain pointwise result is not stored once but recomputed into a copy for each consumer that
# needs fixed strides, as the ring-attention kernel does (two small kernels per layer, 64 in a
# frame's LM alone); an op's output is a buffer that every layer reads.
@torch.library.custom_op("personaplex::rope_angles", mutates_args=())
def shared_rope_angles(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_angles`, computed once per forward under torch.compile."""
    return rope_angles(positions, head_dim, max_period)


@shared_rope_angles.register_fake
def _rope_angles_shape(positions: torch.Tensor, head_dim: int, max_period: float) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*positions.shape, head_dim // 2)
    return positions.new_empty(shape, dtype=torch.float32), positions.new_empty(shape, dtype=torch.float32)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (even, odd) channel pairs of `x` [B, H, T, D] by the angles whose
    cos and sin `rope_angles` gave, in float32; the result has the input dtype."""
    cos, sin = cos[:, None], sin[:, None]  # the same angles for every head
    pairs = x.float().unflatten(-1, (x.shape[-1] // 2, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


# The fused depformer step against the compiled one on an H200: the whole one-row graphed
# frame 7.80 ms against 8.35 in bf16 (run I, docs/PERFORMANCE.md), 6.20 against 6.60 with fp8
# weights (run K); the depformer's 8 steps alone (bench/depformer_fused.py) 1.64 against
# 1.43 ms at two rows.
FUSED_DEPFORMER_PAYS_UP_TO = 1

# Frames of this many rows or more run the temporal int4 layers on the int4 tensor-core kernel
# (`Kernels.int4_tensor_cores_from_rows`). A frame's 128 temporal int4 products on an H200
# (bench/int4_mma.py, run AD), the Triton int4 kernels -> the tensor-core kernel (cuBLAS on bf16
# weights): 2 rows 2.78 -> 1.85 ms (3.92), 8 rows 3.86 -> 1.90 (4.06), 32 rows 4.91 -> 3.07
# (4.17), 64 rows 5.90 -> 4.28 (4.16).
INT4_TENSOR_CORES_PAY_FROM = 1

# Frames of this many rows or more run the depformer's int4 layers on it too
# (`Kernels.int4_depformer_tensor_cores_from_rows`). A frame's 200 depformer int4 products on an
# H200 (run AE), as above: 8 rows 1.45 -> 0.97 ms (1.15), 32 rows 1.81 -> 1.20 (1.17), 64 rows
# 2.05 -> 1.52 (1.24); the int4 frame at 64 rows 12.68 -> 12.20 ms back to back. At one row
# the whole frame lost (3.96 -> 4.16 ms back to back): up to GEMV_MAX_ROWS rows these products
# stay on the Triton GEMV.
INT4_DEPFORMER_TENSOR_CORES_PAY_FROM = GEMV_MAX_ROWS + 1


@dataclass(frozen=True)
class Kernels:
    """Which Triton kernels a frame takes in place of the readable code: what a runner
    chooses and passes down the forward (nothing here is switched process-wide).

    `ring_attention`: three streaming attentions write a few new keys into a ring and attend
    over it: a live LM frame over its KV ring, Mimi's transformer steps, the depformer's
    codebook steps. The readable choice writes with a scatter and runs SDPA with a mask over
    every slot. The fast one is one Triton kernel for all three (`kernels/ring_attention.py`)
    that writes and attends in one launch and reads only the filled slots (fp8 caches as they
    are). Each kernel runs on CUDA, or under Triton's interpreter on the CPU. Everything else
    has one implementation: the fast frame gets its fused norms, RoPE and gates by compiling
    the whole frame (`FrameRunner`), not from a second copy of those functions.

    `fused_depformer_max_rows` runs each depformer step (every layer, then the logits head)
    as one Triton launch (`kernels/fused_depformer.py`) for frames of up to that many rows
    (0: never), where the step's linears are plain ones in the activations' dtype or fp8 ones
    (`LMModel.depformer_step_fusable`). `fast()` takes it for one row only: with more, the
    compiled step's products are faster. With `sampling` too, a frame's steps and their draws
    are one launch (`LMModel.fused_depformer_frame`, where `depformer_frame_fusable`).

    `sampling` draws each token of top-k sampling in one Triton launch per sampled token
    (`kernels/sampling.py`: the k-th largest logit without sorting, the noise and the draw)
    instead of the readable sampler's sort and element-wise steps (`runtime/sampling.py`).

    `gemv` sends products of up to GEMV_MAX_ROWS rows through a plain linear layer (weights in
    a float dtype, as `nn.Linear` or a bare weight holds them) to the GEMV kernel the quantized
    formats use (`kernels/quantized_matmul.py`, `WeightKind.PLAIN`) instead of cuBLAS: at a row
    or two a product only streams its weights, and that kernel streams them faster (`linear`).

    `conv_products` runs Mimi's small convolutions (all of one conversation's frame) as matrix
    products of their unfolded input, through `linear` (so the GEMV at one or two rows), instead
    of cuDNN's convolutions (`mimi/conv.py`).

    `int4_tensor_cores_from_rows`: a frame runner for at least this many rows rearranges the
    temporal transformer's int4 layers for the int4 tensor-core kernel (`kernels/int4_mma.py`,
    `quantize.use_int4_tensor_cores`), faster than the Triton int4 kernels at every row count
    measured (`INT4_TENSOR_CORES_PAY_FROM`); 0: never (they keep MLX's order and the Triton kernels).
    `int4_depformer_tensor_cores_from_rows`: the same for the depformer's int4 layers, from more
    rows (`INT4_DEPFORMER_TENSOR_CORES_PAY_FROM`). Layers are rearranged in place, once: a
    model's later runners of fewer rows keep them so.
    """

    ring_attention: bool = False
    fused_depformer_max_rows: int = 0
    sampling: bool = False
    gemv: bool = False
    conv_products: bool = False
    int4_tensor_cores_from_rows: int = 0
    int4_depformer_tensor_cores_from_rows: int = 0

    @staticmethod
    def fast() -> "Kernels":
        return Kernels(ring_attention=True, fused_depformer_max_rows=FUSED_DEPFORMER_PAYS_UP_TO, sampling=True,
                       gemv=True, conv_products=True, int4_tensor_cores_from_rows=INT4_TENSOR_CORES_PAY_FROM,
                       int4_depformer_tensor_cores_from_rows=INT4_DEPFORMER_TENSOR_CORES_PAY_FROM)


READABLE_KERNELS = Kernels()

LinearWeights = nn.Module | torch.Tensor  # a linear layer of any weight format, or a bare weight [N, K]


def plain_weight(layer: LinearWeights) -> torch.Tensor | None:
    """The float weight [N, K] the GEMV reads for a bare weight or a bias-free `nn.Linear`;
    None for anything else (the quantized layers route their own products)."""
    if isinstance(layer, torch.Tensor):
        return layer
    return layer.weight if type(layer) is nn.Linear and layer.bias is None else None


def kernel_operands(layer: LinearWeights) -> KernelOperands | None:
    """What the quantized-matmul ops take after x for this layer: a quantized layer's own
    (`kernel_operands()`), or a plain weight's (`plain_weight`); None for anything else."""
    weight = plain_weight(layer)
    if weight is not None:
        return weight, None, None, int(WeightKind.PLAIN), 1
    operands = getattr(layer, "kernel_operands", None)
    return operands() if operands is not None else None


def linear(layer: LinearWeights, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """layer(x) for a linear layer of any weight format, or x @ layer.T for a bare weight.

    With `kernels.gemv`, up to GEMV_MAX_ROWS rows take the GEMV kernel. On an H200 it reads
    bf16 weights at 2.9-4.0 TB/s where cuBLAS reads them at 2.4-3.8, 3.55 against 3.98 ms for a
    frame's 128 temporal products (bench/linear_kernels.py --gemv, docs/PERFORMANCE.md run M),
    and Mimi's float32 transformer products at two rows in 2.4-4.1 us against cuBLAS's 4.3-10.2
    (--gemv-mimi, run N). The quantized layers send their products to that kernel themselves."""
    rows = x.numel() // x.shape[-1]
    weight = plain_weight(layer) if kernels.gemv and rows <= GEMV_MAX_ROWS else None
    if weight is not None and kernels_can_run(x):
        out = cuda_op("quantized_linear")(x.reshape(rows, -1).contiguous(), weight, None, None, int(WeightKind.PLAIN), 1)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, layer) if isinstance(layer, torch.Tensor) else layer(x)


class GatedFFN(nn.Module):
    """SiLU-gated feed-forward: `linear_in` yields two halves a, b; out = linear_out(silu(a) * b)."""

    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.linear_out = nn.Linear(hidden, dim, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        return linear(self.linear_out, self.gated_input(x, kernels), kernels)

    def gated_input(self, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        """silu(a) * b of the first product, in one launch where a kernel has the gate in its
        epilogue, instead of the product and the gate's own kernel: with `kernels.gemv`, the GEMV
        up to GEMV_MAX_ROWS rows (32 a one-conversation frame's temporal layers); at any number
        of rows, the int4 tensor-core kernel, whose layout a frame runner chose for this layer
        (`Int4TensorCoreLinear.halves_interleaved`)."""
        rows = x.numel() // x.shape[-1]
        operands = kernel_operands(self.linear_in)
        tensor_cores = getattr(self.linear_in, "halves_interleaved", False) and x.is_cuda
        gemv = (kernels.gemv and rows <= GEMV_MAX_ROWS and operands is not None
                and operands[3] != WeightKind.INT4_MMA and kernels_can_run(x))
        if not (tensor_cores or gemv):
            return silu_gate(linear(self.linear_in, x, kernels))
        gated = cuda_op("quantized_gated_linear")(x.reshape(rows, -1).contiguous(), *operands)
        return gated.reshape(*x.shape[:-1], gated.shape[-1])


def silu_gate(hidden: torch.Tensor) -> torch.Tensor:
    gate, value = hidden.chunk(2, dim=-1)
    return F.silu(gate) * value


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, H, T, D]."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H*D]."""
    return x.transpose(1, 2).flatten(-2)


def embed_with_zero(embedding: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
    """Look up `tokens`, where the id -1 means "no input" and embeds to exactly zero."""
    vectors = embedding(tokens.clamp(min=0))
    return torch.where((tokens == -1)[..., None], torch.zeros((), dtype=vectors.dtype, device=vectors.device), vectors)
