"""Weight formats for the LM's linear layers: bf16, fp8 (e4m3) and affine int4/int8.

`quantize_model` swaps `nn.Linear` leaves for quantized modules in place, one layer at a
time, so quantizing the 16 GB bf16 model never holds a second full copy.

Formats
- int4 / int8: MLX's affine groups, w = q * scale + bias with q in [0, 2^bits), one fp16
  scale and bias per `group_size` inputs of a row (32, 64 or 128). Codes are stored as bytes
  in input order, two 4-bit codes per byte low nibble first: exactly the bytes of MLX's
  uint32 words on a little-endian machine, so MLX files load without repacking (see mlx.py).
- fp8: float8 e4m3 weights with one float32 scale per output row (amax / 448).
- bf16: the plain `nn.Linear`, cast to bf16.

On CUDA the quantized layers run the Triton kernels of `kernels/quantized_matmul.py`
(weights dequantized in registers, see docs/QUANTIZATION.md for why these and not torch's
tinygemm or `_scaled_mm`); elsewhere they dequantize to the activation dtype and call
`F.linear`, which is exact with respect to the stored weights and fast enough for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .formats import WEIGHT_FORMATS
from .kernels import KernelOperands, WeightKind, cuda_op, int4_mma
from .layers import GatedFFN

WeightFormat = Literal["bf16", "fp8", "int4", "int8"]
GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
FP8_MAX = 448.0  # largest finite float8 e4m3fn value



# --------------------------------------------------------------------------- affine int4 / int8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes uint8 [N, K] in [0, 2^bits) -> bytes [N, K * bits / 8], low nibble first for 4 bits."""
    if bits == 8:
        return codes.contiguous()
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: bytes -> codes uint8 [N, K]."""
    if bits == 8:
        return packed
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def quantize_affine(
    weight: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight [N, K] -> (packed bytes, scales fp16 [N, K/G], biases fp16 [N, K/G]).

    Each group maps its [min, max] onto the 2^bits codes (as MLX's conversion of this model
    does). The codes are rounded against the fp16 scale and bias actually stored, so the
    rounding of the scale is not added to the error a second time.
    """
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"input size {in_features} is not a multiple of the group size {group_size}")
    top = (1 << bits) - 1
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scales = ((high - low) / top).to(torch.float16)
    biases = low.to(torch.float16)
    # A constant group has scale 0: any code reproduces it, so divide by 1 instead.
    safe_scales = torch.where(scales == 0, 1.0, scales.float())
    codes = ((groups - biases.float()[..., None]) / safe_scales[..., None]).round_().clamp_(0, top)
    codes = codes.to(torch.uint8).reshape(out_features, in_features)
    return pack_codes(codes, bits), scales, biases


def dequantize_affine(
    packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    codes = unpack_codes(packed, bits).float()
    out_features, in_features = codes.shape
    groups = codes.reshape(out_features, in_features // group_size, group_size)
    weight = groups * scales.float()[..., None] + biases.float()[..., None]
    return weight.reshape(out_features, in_features).to(dtype)


class AffineQuantizedLinear(nn.Module):
    """A bias-free linear layer with `bits`-bit affine group-quantized weights (MLX's format)."""

    bits: int
    kernel_kind: WeightKind

    def __init__(self, in_features: int, out_features: int, group_size: int = 64, device=None):
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
        if in_features % group_size:
            raise ValueError(f"input size {in_features} is not a multiple of the group size {group_size}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features * self.bits // 8, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.float16, device=device))
        self.register_buffer("biases", torch.empty(out_features, groups, dtype=torch.float16, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int) -> "AffineQuantizedLinear":
        module = cls(weight.shape[1], weight.shape[0], group_size, device="meta")
        module.qweight, module.scales, module.biases = quantize_affine(weight, cls.bits, group_size)
        return module

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_affine(self.qweight, self.scales, self.biases, self.bits, self.group_size, dtype)

    def kernel_operands(self) -> KernelOperands:
        return self.qweight, self.scales, self.biases, int(self.kernel_kind), self.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _kernel_or_dequantized(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class Int4Linear(AffineQuantizedLinear):
    bits = 4
    kernel_kind = WeightKind.INT4


class Int8Linear(AffineQuantizedLinear):
    bits = 8
    kernel_kind = WeightKind.INT8


class Int4TensorCoreLinear(nn.Module):
    """An `Int4Linear` with its codes, scales and biases rearranged for the tensor-core kernel
    (`kernels/int4_mma.py`, CUDA only): the same weights, the same bytes, another order.
    Made by `use_int4_tensor_cores`; `dequantized_weight` reads the original order back.

    `halves_interleaved`: a gated feed-forward's first layer, its halves a, b interleaved
    (`int4_mma.interleave_halves`) so that the kernel writes silu(a) * b itself
    (`quantized_gated_linear`, which `GatedFFN` calls); its plain product is put back in order."""

    def __init__(self, layer: Int4Linear, halves_interleaved: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.group_size = layer.in_features, layer.out_features, layer.group_size
        self.halves_interleaved = halves_interleaved
        words, scale_bias = int4_mma.to_fragment_order(unpack_codes(layer.qweight, 4), layer.scales, layer.biases,
                                                       gated=halves_interleaved)
        self.register_buffer("words", words)
        self.register_buffer("scale_bias", scale_bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codes, scales, biases = int4_mma.from_fragment_order(self.words, self.scale_bias, gated=self.halves_interleaved)
        return dequantize_affine(pack_codes(codes, 4), scales, biases, 4, self.group_size, dtype)

    def kernel_operands(self) -> KernelOperands:
        return self.words, self.scale_bias, None, int(WeightKind.INT4_MMA), self.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _kernel_or_dequantized(self, x)
        if self.halves_interleaved and x.is_cuda:  # the kernel's outputs in the rows' interleaved order
            out = int4_mma.separate_halves(out.movedim(-1, 0)).movedim(0, -1)
        return out

    def extra_repr(self) -> str:
        order = "tensor-core order, halves interleaved" if self.halves_interleaved else "tensor-core order"
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=4, group_size={self.group_size}, {order}"


# --------------------------------------------------------------------------- fp8


class Fp8Linear(nn.Module):
    """A bias-free linear layer with float8 e4m3 weights and one float32 scale per output row.

    The codes are held as their uint8 bit patterns: `Module.to(dtype)` casts every floating
    buffer, and would otherwise turn the fp8 weights into bf16 ones.
    """

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_bits", torch.empty(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "Fp8Linear":
        module = cls(weight.shape[1], weight.shape[0], device="meta")
        w = weight.float()
        scales = w.abs().amax(dim=1).clamp_(min=1e-12) / FP8_MAX
        module.weight_bits = (w / scales[:, None]).to(torch.float8_e4m3fn).view(torch.uint8)
        module.scales = scales
        return module

    @property
    def weight_fp8(self) -> torch.Tensor:
        return self.weight_bits.view(torch.float8_e4m3fn)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight_fp8.float() * self.scales.float()[:, None]).to(dtype)

    def kernel_operands(self) -> KernelOperands:
        return self.weight_fp8, self.scales.float(), None, int(WeightKind.FP8), 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _kernel_or_dequantized(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


def _kernel_or_dequantized(layer: AffineQuantizedLinear | Int4TensorCoreLinear | Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    """A quantized layer's product: the quantized-matmul kernel on CUDA, else float math on the
    dequantized weight."""
    if x.is_cuda:
        x2d = x.reshape(-1, layer.in_features).contiguous()
        out = cuda_op("quantized_linear")(x2d, *layer.kernel_operands()).to(x.dtype)  # int4 tensor cores: maybe float32 sums
        return out.reshape(*x.shape[:-1], layer.out_features)
    return F.linear(x, layer.dequantized_weight(x.dtype))


# --------------------------------------------------------------------------- whole models


def default_filter(name: str) -> bool:
    """The layers MLX's conversion quantizes: every temporal and depformer linear, and
    `depformer_in`; `text_linear` and the `linears.*` heads stay bf16 (they decide the tokens)."""
    return name.startswith(("transformer.", "depformer.", "depformer_in."))


def quantize_linear(linear: nn.Linear, fmt: WeightFormat, group_size: int = 64) -> nn.Module:
    """The quantized replacement of one bias-free `nn.Linear`, on the device of its weight."""
    if linear.bias is not None:
        raise ValueError("quantized layers have no bias; this model's linear layers never do")
    weight = linear.weight.detach()
    if fmt == "int4":
        return Int4Linear.from_weight(weight, group_size)
    if fmt == "int8":
        return Int8Linear.from_weight(weight, group_size)
    if fmt == "fp8":
        return Fp8Linear.from_weight(weight)
    if fmt == "bf16":
        return linear.to(torch.bfloat16)
    raise ValueError(f"unknown weight format {fmt!r}; expected one of {WEIGHT_FORMATS}")


def quantize_model(
    model: nn.Module,
    fmt: WeightFormat,
    *,
    group_size: int = 64,
    include: Callable[[str], bool] = default_filter,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace every `nn.Linear` whose name passes `include` by its `fmt` form, in place.

    Layers are converted one at a time and the bf16 original is dropped before the next, so
    peak memory is the model plus one layer. With `device`, each weight is moved there before
    it is quantized (e.g. quantize a CPU-loaded model straight onto the GPU: the GPU then
    only ever holds the quantized layers). Other modules are left where they are.
    """
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {WEIGHT_FORMATS}")
    if fmt in ("int4", "int8") and group_size not in GROUP_SIZES:
        raise ValueError(f"group size must be one of {GROUP_SIZES}, got {group_size}")
    # Names only: holding the modules themselves would keep every original weight alive.
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and include(name)]
    with torch.no_grad():
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, attr)
            if device is not None:
                linear = linear.to(device)
            try:
                replacement = quantize_linear(linear, fmt, group_size)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from exc
            setattr(parent, attr, replacement)
            del linear
    return model


def is_temporal_layer(name: str) -> bool:
    """A linear of the temporal transformer (one product a frame, of all its rows)."""
    return name.startswith("transformer.")


def is_depformer_layer(name: str) -> bool:
    """A linear of the depformer: its steps' layers and each step's input product."""
    return name.startswith(("depformer.", "depformer_in."))


def use_int4_tensor_cores(model: nn.Module, include: Callable[[str], bool] = default_filter) -> int:
    """Rearrange every `Int4Linear` whose name passes `include` (by default the temporal
    transformer's and the depformer's) for the int4 tensor-core kernel (`Int4TensorCoreLinear`),
    in place, where that kernel can run (a CUDA GPU of compute capability 8.0 or newer with
    NVRTC; shapes of N % 16 == 0 and K % 64 == 0); a `GatedFFN`'s first layer with its halves
    interleaved, for the gate in the kernel. Returns how many layers changed. Once a layer,
    before any CUDA graph captures its tensors."""
    names = [name for name, module in model.named_modules()
             if type(module) is Int4Linear and include(name) and int4_mma.fits(module.out_features, module.in_features)
             and int4_mma.available(module.qweight.device)]
    with torch.no_grad():
        for name in names:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            gated = isinstance(parent, GatedFFN) and attr == "linear_in"
            setattr(parent, attr, Int4TensorCoreLinear(getattr(parent, attr), halves_interleaved=gated))
    return len(names)
