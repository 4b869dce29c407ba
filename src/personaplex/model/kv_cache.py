"""Ring KV cache of the temporal transformer: the last `context - 1` frames of every layer.

One `TemporalState` holds the whole streaming state of the temporal transformer for a
batch of conversations. Each batch row has its own position, so conversations that
started at different times (or were restored from a cached persona) share one batch.

Keys and values are stored in the activation dtype, or in float8 (e4m3) to halve the cache:
at 3000 frames a conversation's cache is 1.57 GB in bf16 and 0.79 GB in fp8, which decides
how many conversations fit on one GPU.

Slot `s` of row `b` holds the keys/values of the frame at position `slot_positions[b, s]`
(-1: empty). A frame at position p is written at slot p % capacity. The ring has
`ring_capacity(context)` = context - 1 slots, so it always holds exactly the frames a live
frame may see (see `ring_capacity`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def ring_capacity(context: int) -> int:
    """Slots of a streaming KV ring for a model whose config says `context`: context - 1.

    NVIDIA's reference (`RingKVCache.complete` in NVIDIA/personaplex) keeps a ring of
    `context` slots but labels the slot it will write next with a position one past the
    newest key, so the causal mask always hides it once the ring has wrapped. A query thus
    sees the keys of the last context - 1 positions written, anchored at the newest one,
    whether the chunk written before attending is one frame (the LM) or two steps (Mimi).
    A ring of context - 1 slots, written before attending, holds exactly those keys: the
    same outputs, with no slot to skip. (Upstream moshi 0.2.13 labels that slot correctly
    and shows `context` keys; PersonaPlex is defined by NVIDIA's inference code.)
    Whole-sequence forwards keep the reference's `context`-wide causal window.
    """
    return context - 1


@dataclass
class TemporalState:
    keys: torch.Tensor  # [layers, B, heads, capacity, head_dim]
    values: torch.Tensor  # [layers, B, heads, capacity, head_dim]
    slot_positions: torch.Tensor  # [B, capacity] int64, -1 where empty
    next_position: torch.Tensor  # [B] int64: position the next frame will get

    @classmethod
    def empty(
        cls,
        num_layers: int,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> "TemporalState":
        shape = (num_layers, batch_size, num_heads, capacity, head_dim)
        return cls(
            keys=torch.zeros(shape, device=device, dtype=dtype),
            values=torch.zeros(shape, device=device, dtype=dtype),
            slot_positions=torch.full((batch_size, capacity), -1, device=device, dtype=torch.long),
            next_position=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    @property
    def batch_size(self) -> int:
        return self.next_position.shape[0]

    @property
    def capacity(self) -> int:
        return self.slot_positions.shape[1]

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Forget the history of the rows in the bool mask `rows` (all rows if None)."""
        if rows is None:
            self.slot_positions.fill_(-1)
            self.next_position.zero_()
            return
        self.slot_positions.masked_fill_(rows[:, None], -1)
        self.next_position.masked_fill_(rows, 0)

    def chunk_positions(self, num_frames: int) -> torch.Tensor:
        """Positions [B, T] of the next `num_frames` frames of every row."""
        steps = torch.arange(num_frames, device=self.next_position.device)
        return self.next_position[:, None] + steps

    def filled_slots_after(self, positions: torch.Tensor) -> torch.Tensor:
        """How many slots [B] hold a frame once the single frame at `positions` is written:
        slots fill from 0 upwards until the ring wraps, then all of them."""
        return torch.clamp(positions[:, -1] + 1, max=self.capacity)

    def filled_slot_mask(self, filled_slots: torch.Tensor) -> torch.Tensor:
        """Mask [B, 1, 1, capacity] of the first `filled_slots[b]` slots: everything a single
        live frame sees, since the ring holds only frames of its window and none after it."""
        slots = torch.arange(self.capacity, device=filled_slots.device)
        return (slots < filled_slots[:, None])[:, None, None]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store a chunk's keys/values [B, H, T, D] of one layer at their ring slots."""
        # A chunk longer than the ring keeps only its newest frames (older ones would be overwritten).
        keys, values = keys[:, :, -self.capacity :], values[:, :, -self.capacity :]
        slots = positions[:, -self.capacity :] % self.capacity  # [B, T]
        index = slots[:, None, :, None].expand_as(keys)
        for cache, new in ((self.keys[layer], keys), (self.values[layer], values)):
            write_slots(cache, index, new.to(cache.dtype))

    def layer_kv(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's keys and values [B, H, capacity, D] in `dtype` (a copy only for fp8)."""
        return self.keys[layer].to(dtype), self.values[layer].to(dtype)

    def advance(self, positions: torch.Tensor) -> None:
        """Record that the chunk at `positions` [B, T] is now in the cache (after every layer wrote it)."""
        newest = positions[:, -self.capacity :]
        self.slot_positions.scatter_(1, newest % self.capacity, newest)
        self.next_position.copy_(positions[:, -1] + 1)


# A custom op that mutates the cache: torch.compile keeps it as one in-place scatter instead of
# lowering the float8 byte view below, which its code generators do not all handle.
@torch.library.custom_op("personaplex::write_slots", mutates_args=("cache",))
def write_slots(cache: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> None:
    """cache.scatter_(2, index, new) for any cache dtype (scatter has no float8 kernel: the
    bytes are moved instead)."""
    if cache.dtype == torch.float8_e4m3fn:
        cache, new = cache.view(torch.uint8), new.view(torch.uint8)
    cache.scatter_(2, index, new)


@write_slots.register_fake
def _write_slots_shape(cache: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> None:
    return None


def sliding_window_mask(query_positions: torch.Tensor, key_positions: torch.Tensor, context: int) -> torch.Tensor:
    """Causal sliding-window mask [B, 1, T, S]: a query at p sees keys at q with p - context < q <= p.

    Keys at a negative position are empty slots and are never seen.
    """
    delta = query_positions[:, :, None] - key_positions[:, None, :]
    visible = (key_positions[:, None, :] >= 0) & (delta >= 0) & (delta < context)
    return visible[:, None]
