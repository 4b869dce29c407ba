"""Causal 1-D convolutions whose streaming state lives in explicit tensors.

Every convolution of Mimi is causal. A streaming Conv1d keeps the last
`kernel_span - stride` input samples of each row and prepends them to the next chunk; a
streaming ConvTranspose1d keeps the `kernel - stride` output samples that overlap the next
chunk and adds them in. A whole clip is the same computation started from a fresh (zero)
state, so both modes share one code path, exactly as upstream moshi does.

The state tensors are owned by the caller (see `state.py`) and updated in place, so a step
has static shapes and no host synchronisation (it can be captured in a CUDA graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x: torch.Tensor, previous: torch.Tensor, fresh: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, T] with T a multiple of the stride -> [B, C_out, T / stride].

        `previous` is updated in place. `fresh` ([B] bool, rows that have seen no input yet) is
        needed only with `replicate_pad`.
        """
        if self.context == 0:
            return self._conv(x)
        if self.replicate_pad:
            if fresh is None:
                raise ValueError("a replicate-padded conv needs the `fresh` row flags")
            previous.copy_(torch.where(fresh.view(-1, 1, 1), x[..., :1], previous))
        x = torch.cat([previous, x], dim=-1)
        y = self._conv(x)
        previous.copy_(x[..., -self.context :])
        return y

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


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

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The pending overlap, [B, out_channels, kernel - stride], zero = start of a stream."""
        return torch.zeros(batch_size, self.out_channels, self.overlap, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        """x [B, C, T] -> [B, C_out, T * stride]; `partial` is updated in place."""
        y = F.conv_transpose1d(x, self.weight, self.bias, self.stride, groups=self.groups)
        y[..., : self.overlap] += partial
        tail = y[..., -self.overlap :]
        if self.bias is not None:
            # The next step adds its own bias to these samples: carry them without ours.
            tail = tail - self.bias[:, None]
        partial.copy_(tail)
        return y[..., : -self.overlap]


StreamingConv = StreamingConv1d | StreamingConvTranspose1d


def streaming_convs(root: nn.Module) -> list[StreamingConv]:
    """The streaming convs under `root` in registration order, which is execution order for
    Mimi's sequential stacks. Each gets `state_slot`, its index in that list (and so in the
    stack's list of state buffers)."""
    convs = [m for m in root.modules() if isinstance(m, StreamingConv)]
    for slot, conv in enumerate(convs):
        conv.state_slot = slot
    return convs
