"""Causal 1-D convolutions whose streaming state lives in explicit tensors.

Every convolution of Mimi is causal. A streaming Conv1d keeps the last
`kernel_span - stride` input samples of each row and prepends them to the next chunk; a
streaming ConvTranspose1d keeps the `kernel - stride` output samples that overlap the next
chunk and adds them in. A whole clip is the same computation started from a fresh (zero)
state, so both modes share one code path, exactly as upstream moshi does.

The state tensors are owned by the caller (see `state.py`) and updated in place, so a step
has static shapes and no host synchronisation (it can be captured in a CUDA graph).

With `Kernels.conv_products` a small convolution runs as one matrix product instead of
cuDNN's: its input unfolded into columns (one row per output sample, `in_channels x kernel`
wide) times the weight seen as [out_channels, in_channels x kernel], through `layers.linear`
(the GEMV at one or two rows, cuBLAS beyond); a transposed one as the product of its input
with the weight seen as [in_channels, out_channels x kernel], whose taps are then added where
they overlap (through `linear` too once `keep_product_weight` has kept that weight transposed,
as the frame runner has it: the GEMV reads [outputs, inputs] rows). A streaming step of one
conversation convolves at most 1920 samples of up to 1024 channels: cuDNN's implicit GEMMs
want channels-last tensors and convert both the input and the weight on every call, which on
an H200 took as long as the convolutions themselves, and its transposed convolutions read
their weights far below the memory's speed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from personaplex.model.layers import READABLE_KERNELS, Kernels, linear

# Up to this many multiply-adds x 2 a convolution runs as a product when `Kernels.conv_products`
# asks for it: the products run in float32 on the CUDA cores, where cuDNN's run in TF32 on the
# tensor cores, so the large convolutions of many conversations stay with cuDNN. Every
# convolution of one conversation's frame is below it (the largest, 63 MFLOP).
CONV_PRODUCT_MAX_FLOPS = 1 << 27


def _as_product(kernels: Kernels, product_shape: bool, flops: int) -> bool:
    """Whether a convolution of `flops` runs as a product: asked for, of a shape the products
    take (`product_shape`), and no larger than CONV_PRODUCT_MAX_FLOPS."""
    return kernels.conv_products and product_shape and flops <= CONV_PRODUCT_MAX_FLOPS


class StreamingConv1d(nn.Module):
    """Causal Conv1d. `replicate_pad` starts a stream by repeating its first sample instead of
    zeros (Mimi's downsampling conv does this)."""

    state_slot: int  # index of this conv's buffer in its stack's state list (see `streaming_convs`)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        replicate_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.replicate_pad = replicate_pad
        # Input samples a step needs from before its chunk.
        self.context = (kernel_size - 1) * dilation + 1 - stride
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The carried input tail, [B, in_channels, context], zero = start of a stream."""
        return torch.zeros(batch_size, self.in_channels, self.context, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, previous: torch.Tensor, fresh: torch.Tensor | None = None,
                kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """x [B, C, T] with T a multiple of the stride -> [B, C_out, T / stride].

        `previous` is updated in place. `fresh` ([B] bool, rows that have seen no input yet) is
        needed only with `replicate_pad`.
        """
        if self.context == 0:
            return self._conv(x, kernels)
        if self.replicate_pad:
            if fresh is None:
                raise ValueError("a replicate-padded conv needs the `fresh` row flags")
            previous.copy_(torch.where(fresh.view(-1, 1, 1), x[..., :1], previous))
        x = torch.cat([previous, x], dim=-1)
        y = self._conv(x, kernels)
        previous.copy_(x[..., -self.context :])
        return y

    def _conv(self, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        out_channels, _, kernel_size = self.weight.shape
        batch, _, length = x.shape
        steps = (length - (kernel_size - 1) * self.dilation - 1) // self.stride + 1
        if not _as_product(kernels, self.groups == 1, 2 * batch * steps * self.weight.numel()):
            return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        # Output sample t reads inputs t * stride + j * dilation, j < kernel_size: one row of
        # columns, ordered (channel, j) as the weight's [out, in, kernel] layout is.
        span = (kernel_size - 1) * self.dilation + 1
        windows = x.unfold(-1, span, self.stride)[..., :: self.dilation]  # [B, C_in, steps, kernel]
        columns = windows.transpose(1, 2).reshape(batch * steps, -1)
        y = linear(self.weight.flatten(1), columns, kernels)
        if self.bias is not None:
            y = y + self.bias
        return y.view(batch, steps, out_channels).transpose(1, 2)


class StreamingConvTranspose1d(nn.Module):
    """Causal ConvTranspose1d: all trimming on the right, the overlap carried to the next step."""

    state_slot: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kernel_size <= stride:
            raise ValueError(f"kernel_size ({kernel_size}) must exceed stride ({stride})")
        self.out_channels = out_channels
        self.stride = stride
        self.groups = groups
        # Output samples of a step that overlap the next step's output.
        self.overlap = kernel_size - stride
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(in_channels, out_channels // groups, kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        # The weight as its product's [out_channels x kernel, in_channels] matrix, once kept (not
        # in the checkpoint: it is derived from `weight`).
        self.register_buffer("product_weight", None, persistent=False)

    def keep_product_weight(self) -> None:
        """Keep the weight transposed for the product (`_conv_transpose`), so that the product
        can take `linear` and so the GEMV: a decoder's first transposed convolution has two input
        samples a frame at one conversation, and cuBLAS read its 34 MB at ~1 TB/s (H200,
        sgemm_largek, 36 us a frame, run S's kernel sequence). Call it after loading the weights.
        Kept once: a captured CUDA graph may already read the matrix kept first."""
        if self.groups == 1 and self.product_weight is None:
            self.product_weight = self.weight.detach().flatten(1).t().contiguous()

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The pending overlap, [B, out_channels, kernel - stride], zero = start of a stream."""
        return torch.zeros(batch_size, self.out_channels, self.overlap, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, partial: torch.Tensor, kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """x [B, C, T] -> [B, C_out, T * stride]; `partial` is updated in place."""
        y = self._conv_transpose(x, kernels)
        y[..., : self.overlap] += partial
        tail = y[..., -self.overlap :]
        if self.bias is not None:
            # The next step adds its own bias to these samples: carry them without ours.
            tail = tail - self.bias[:, None]
        partial.copy_(tail)
        return y[..., : -self.overlap]

    def _conv_transpose(self, x: torch.Tensor, kernels: Kernels) -> torch.Tensor:
        """[B, C, T] -> [B, C_out, (T - 1) * stride + kernel], bias included."""
        in_channels, out_per_group, kernel_size = self.weight.shape
        batch, _, steps = x.shape
        depthwise = self.groups == in_channels == out_per_group * self.groups
        if not _as_product(kernels, self.groups == 1 or depthwise, 2 * batch * steps * self.weight.numel()):
            return F.conv_transpose1d(x, self.weight, self.bias, self.stride, groups=self.groups)
        # Input sample t adds its taps [C_out, kernel] at outputs t * stride .. t * stride + kernel - 1.
        inputs = x.transpose(1, 2)  # [B, T, C_in]
        if depthwise:
            taps = inputs[..., None] * self.weight[:, 0, :]
        else:
            columns = inputs.reshape(batch * steps, in_channels)
            if self.product_weight is not None:
                products = linear(self.product_weight, columns, kernels)
            else:
                products = columns @ self.weight.flatten(1)
            taps = products.view(batch, steps, -1, kernel_size)
        # Cut each input's taps into `spans` runs of `stride` outputs; run j of input t lands on
        # output block t + j, so output block u sums run j of input u - j.
        spans = math.ceil(kernel_size / self.stride)
        runs = F.pad(taps, (0, spans * self.stride - kernel_size)).unflatten(-1, (spans, self.stride))
        blocks = sum(F.pad(runs[..., j, :], (0, 0, 0, 0, j, spans - 1 - j)) for j in range(spans))
        y = blocks.permute(0, 2, 1, 3).flatten(2)[..., : (steps - 1) * self.stride + kernel_size]
        return y if self.bias is None else y + self.bias[:, None]


StreamingConv = StreamingConv1d | StreamingConvTranspose1d


def streaming_convs(root: nn.Module) -> list[StreamingConv]:
    """The streaming convs under `root` in registration order, which is execution order for
    Mimi's sequential stacks. Each gets `state_slot`, its index in that list (and so in the
    stack's list of state buffers)."""
    convs = [m for m in root.modules() if isinstance(m, StreamingConv)]
    for slot, conv in enumerate(convs):
        conv.state_slot = slot
    return convs
