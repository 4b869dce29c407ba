"""SEANet: Mimi's convolutional encoder (waveform -> 25 Hz latents) and decoder (back).

Layer lists keep upstream's indices (activations included) so parameter names line up with
the official checkpoint: `model.{i}.weight` here is `model.{i}.conv.conv.weight` there.
Convolutions are causal with zero padding, ELU activations, no weight norm (the checkpoint
has it folded in).
"""

from __future__ import annotations

import torch
from torch import nn

from personaplex.model.config import ConfigError, SEANetConfig
from personaplex.model.layers import READABLE_KERNELS, Kernels
from personaplex.model.mimi.conv import StreamingConv, StreamingConv1d, StreamingConvTranspose1d, streaming_convs


class ResnetBlock(nn.Module):
    """x + conv1x1(elu(conv_k(elu(x)))), the inner width reduced by `compress`."""

    def __init__(self, dim: int, kernel_size: int, dilation: int, compress: int, **factory) -> None:
        super().__init__()
        hidden = dim // compress
        self.block = nn.ModuleList(
            [
                nn.ELU(),
                StreamingConv1d(dim, hidden, kernel_size, dilation=dilation, **factory),
                nn.ELU(),
                StreamingConv1d(hidden, dim, 1, **factory),
            ]
        )

    def forward(self, x: torch.Tensor, buffers: list[torch.Tensor], kernels: Kernels) -> torch.Tensor:
        return x + _run(self.block, x, buffers, kernels)


def _run(layers: nn.ModuleList, x: torch.Tensor, buffers: list[torch.Tensor], kernels: Kernels) -> torch.Tensor:
    """Apply a stack of activations, streaming convs and residual blocks in order."""
    for layer in layers:
        if isinstance(layer, StreamingConv):
            x = layer(x, buffers[layer.state_slot], kernels=kernels)
        elif isinstance(layer, ResnetBlock):
            x = layer(x, buffers, kernels)
        else:
            x = layer(x)
    return x


def _check(config: SEANetConfig) -> None:
    if not config.true_skip:
        raise ConfigError("Mimi SEANet with true_skip=False (a conv shortcut) is not implemented")
    if config.dimension <= 0 or config.n_filters <= 0 or not config.ratios:
        raise ConfigError(f"invalid SEANet shape: {config}")


class _SEANetStack(nn.Module):
    """Shared streaming-state plumbing of the encoder and the decoder."""

    model: nn.ModuleList

    def _number_convs(self) -> None:
        self.convs = streaming_convs(self.model)

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        """One carried buffer per conv, indexed by the conv's `state_slot`."""
        return [conv.new_state(batch_size, device, dtype) for conv in self.convs]

    def forward(self, x: torch.Tensor, buffers: list[torch.Tensor], kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """`kernels.conv_products`: the small convolutions as matrix products (`conv.py`)."""
        return _run(self.model, x, buffers, kernels)


class SEANetEncoder(_SEANetStack):
    """[B, channels, T] -> [B, dimension, T / hop_length]; downsamples by the ratios reversed."""

    def __init__(self, config: SEANetConfig, device=None, dtype=None) -> None:
        super().__init__()
        _check(config)
        factory = {"device": device, "dtype": dtype}
        width = config.n_filters
        layers: list[nn.Module] = [StreamingConv1d(config.channels, width, config.kernel_size, **factory)]
        for ratio in reversed(config.ratios):
            layers += _residual_layers(config, width, factory)
            layers += [nn.ELU(), StreamingConv1d(width, 2 * width, 2 * ratio, stride=ratio, **factory)]
            width *= 2
        layers += [nn.ELU(), StreamingConv1d(width, config.dimension, config.last_kernel_size, **factory)]
        self.model = nn.ModuleList(layers)
        self._number_convs()


class SEANetDecoder(_SEANetStack):
    """[B, dimension, F] -> [B, channels, F * hop_length]."""

    def __init__(self, config: SEANetConfig, device=None, dtype=None) -> None:
        super().__init__()
        _check(config)
        factory = {"device": device, "dtype": dtype}
        width = config.n_filters * 2 ** len(config.ratios)
        layers: list[nn.Module] = [StreamingConv1d(config.dimension, width, config.kernel_size, **factory)]
        for ratio in config.ratios:
            layers += [nn.ELU(), StreamingConvTranspose1d(width, width // 2, 2 * ratio, stride=ratio, **factory)]
            width //= 2
            layers += _residual_layers(config, width, factory)
        layers += [nn.ELU(), StreamingConv1d(width, config.channels, config.last_kernel_size, **factory)]
        self.model = nn.ModuleList(layers)
        self._number_convs()


def _residual_layers(config: SEANetConfig, dim: int, factory: dict) -> list[nn.Module]:
    return [
        ResnetBlock(dim, config.residual_kernel_size, config.dilation_base**j, config.compress, **factory)
        for j in range(config.n_residual_layers)
    ]
