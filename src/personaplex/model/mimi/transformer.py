"""Mimi's transformer: causal, sliding-window attention with RoPE, LayerNorm, GELU FFN and
layer scale, on [B, C, T] latents at 25 Hz.

Two modes, each equal to its counterpart in NVIDIA's reference (NVIDIA/personaplex's moshi):
- `forward`: a whole clip, attention masked to the last `context` positions;
- `step`: a few positions per call, keys/values kept in a ring of `context - 1` slots per
  layer (`ring_capacity`): each call's queries see the last context - 1 positions written,
  counted from the call's last position.
They agree while at most context - 1 positions have been written, then differ slightly.
Parameter names follow the official checkpoint (`layers.{i}.self_attn.in_proj_weight`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from personaplex.model.config import MimiTransformerConfig
from personaplex.model.kernels import cuda_op, kernels_can_run
from personaplex.model.kv_cache import ring_capacity
from personaplex.model.layers import READABLE_KERNELS, Kernels, linear, rope, shared_rope_angles


@dataclass
class TransformerState:
    """Streaming state of one Mimi transformer: a key/value ring per layer and the position
    of each row's next step."""

    keys: list[torch.Tensor]  # per layer [B, H, slots, D]; slot = position % slots
    values: list[torch.Tensor]
    offset: torch.Tensor  # [B] int64: positions consumed so far

    def reset(self, rows: torch.Tensor) -> None:
        """Rows of `rows` ([B] bool) start over; the others are untouched."""
        self.offset.masked_fill_(rows, 0)
        for cache in (*self.keys, *self.values):
            cache.masked_fill_(rows.view(-1, 1, 1, 1), 0)


class LayerScale(nn.Module):
    def __init__(self, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class Attention(nn.Module):
    def __init__(self, config: MimiTransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        dim = config.d_model
        self.num_heads = config.num_heads
        self.context = config.context
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, device=device, dtype=dtype))
        self.out_proj = nn.Linear(dim, dim, bias=False, device=device, dtype=dtype)

    def _qkv(self, x: torch.Tensor, kernels: Kernels = READABLE_KERNELS) -> tuple[torch.Tensor, ...]:
        """q, k (before RoPE), v [B, H, T, D] of x [B, T, C]."""
        batch, steps, _ = x.shape
        qkv = linear(self.in_proj_weight, x, kernels).view(batch, steps, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """visible [B or 1, T, S]: which keys each query sees."""
        return self._project_out(F.scaled_dot_product_attention(q, k, v, visible[:, None]), kernels)

    def _project_out(self, out: torch.Tensor, kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """Attention output [B, H, T, D] -> [B, T, C] through out_proj."""
        batch, heads, steps, head_dim = out.shape
        return linear(self.out_proj, out.permute(0, 2, 1, 3).reshape(batch, steps, heads * head_dim), kernels)

    def forward(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Whole clip x [B, T, C], positions 0..T-1 (`angles`: their RoPE cos and sin)."""
        steps = x.shape[1]
        q, k, v = self._qkv(x)
        q, k = rope(q, *angles), rope(k, *angles)
        positions = torch.arange(steps, device=x.device)
        delta = positions.view(-1, 1) - positions.view(1, -1)
        return self._attend(q, k, v, ((delta >= 0) & (delta < self.context))[None])

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offset: torch.Tensor,
             angles: tuple[torch.Tensor, torch.Tensor], kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """x [B, T, C] at positions offset[b] + t (T < ring slots; `angles`: their RoPE cos
        and sin); writes its keys/values into the ring, then attends.

        As in the reference, the T new keys are written first, so the ring then holds the
        last context - 1 positions up to the call's last one, P: a query at q sees the keys at
        k <= q with P - k < context - 1. The first queries of a call thus see fewer keys than
        the whole-clip mask allows once the ring has wrapped. The fast kernel (the LM's ring
        attention) writes and attends in one launch, reading only the filled slots."""
        batch, steps, _ = x.shape
        q, k, v = self._qkv(x, kernels)
        if kernels.ring_attention and kernels_can_run(q):  # RoPE in the kernel
            return self._project_out(cuda_op("ring_attention")(q, k, v, keys, values, offset, *angles), kernels)
        q, k = rope(q, *angles), rope(k, *angles)
        capacity = keys.shape[2]
        new_pos = offset.view(-1, 1) + torch.arange(steps, device=x.device)  # [B, T]
        slots = (new_pos % capacity).view(batch, 1, steps, 1).expand(-1, k.shape[1], -1, k.shape[3])
        keys.scatter_(2, slots, k)
        values.scatter_(2, slots, v)
        # Slot s holds the latest position p <= last with p = s (mod capacity); p < 0: never written.
        last = new_pos[:, -1:]
        key_pos = last - (last - torch.arange(capacity, device=x.device)) % capacity  # [B, slots]
        visible = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= new_pos[:, :, None])
        return self._attend(q, keys, values, visible, kernels)


class TransformerLayer(nn.Module):
    def __init__(self, config: MimiTransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        dim, factory = config.d_model, {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(dim, eps=1e-5, **factory)
        self.self_attn = Attention(config, **factory)
        self.layer_scale_1 = LayerScale(dim, **factory)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5, **factory)
        self.linear1 = nn.Linear(dim, config.dim_feedforward, bias=False, **factory)
        self.linear2 = nn.Linear(config.dim_feedforward, dim, bias=False, **factory)
        self.layer_scale_2 = LayerScale(dim, **factory)

    def _feed_forward(self, x: torch.Tensor, kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        hidden = F.gelu(linear(self.linear1, self.norm2(x), kernels))
        return x + self.layer_scale_2(linear(self.linear2, hidden, kernels))

    def forward(self, x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), angles))
        return self._feed_forward(x)

    def step(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offset: torch.Tensor,
             angles: tuple[torch.Tensor, torch.Tensor], kernels: Kernels) -> torch.Tensor:
        x = x + self.layer_scale_1(self.self_attn.step(self.norm1(x), keys, values, offset, angles, kernels))
        return self._feed_forward(x, kernels)


class MimiTransformer(nn.Module):
    """[B, d_model, T] -> [B, d_model, T]. (Upstream can project in and out of a different
    width; Mimi never does, so the codec checks d_model == SEANet dimension instead.)"""

    def __init__(self, config: MimiTransformerConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([TransformerLayer(config, device, dtype) for _ in range(config.num_layers)])

    def new_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> TransformerState:
        c = self.config
        shape = (batch_size, c.num_heads, ring_capacity(c.context), c.d_model // c.num_heads)
        return TransformerState(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.layers],
            offset=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    def forward(self, x: torch.Tensor, state: TransformerState | None = None,
                kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
        """A whole clip if `state` is None, else the next x.shape[-1] positions of a stream
        (`kernels`: which attention and linear kernels the streaming steps use)."""
        x = x.transpose(1, 2)
        batch, steps, _ = x.shape
        offset = torch.zeros(batch, device=x.device, dtype=torch.long) if state is None else state.offset
        # The RoPE angles of the call's positions, once for every layer.
        angles = shared_rope_angles(offset[:, None] + torch.arange(steps, device=x.device),
                                    self.config.d_model // self.config.num_heads, self.config.max_period)
        if state is None:
            for layer in self.layers:
                x = layer(x, angles)
        else:
            for layer, keys, values in zip(self.layers, state.keys, state.values):
                x = layer.step(x, keys, values, state.offset, angles, kernels)
            state.offset.add_(steps)
        return x.transpose(1, 2)
