"""Explicit streaming state of the Mimi codec: preallocated tensors, updated in place."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from personaplex.model.mimi.transformer import TransformerState


@dataclass
class CodecSideState:
    """State of one direction (encoder or decoder) for every row of a batch."""

    seanet: list[torch.Tensor]  # one carried buffer per SEANet conv, by `state_slot`
    resample: torch.Tensor  # the 25 <-> 12.5 Hz conv's carried input (encoder) / overlap (decoder)
    transformer: TransformerState

    def reset(self, rows: torch.Tensor) -> None:
        """Rows of `rows` ([B] bool) start a new stream; the others are untouched."""
        for buffer in (*self.seanet, self.resample):
            buffer.masked_fill_(rows.view(-1, 1, 1), 0)
        self.transformer.reset(rows)


@dataclass
class MimiStreamState:
    """Encoder and decoder sides are independent: a conversation encodes the user's frame and
    decodes the agent's frame with one state."""

    encoder: CodecSideState
    decoder: CodecSideState

    @property
    def batch_size(self) -> int:
        return self.encoder.transformer.offset.shape[0]

    @property
    def device(self) -> torch.device:
        return self.encoder.transformer.offset.device

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Restart the rows where `rows` ([B] bool) is True, both sides; None = every row."""
        if rows is None:
            rows = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        if rows.dtype != torch.bool or tuple(rows.shape) != (self.batch_size,):
            raise ValueError(
                f"reset rows must be a bool mask of shape [{self.batch_size}], got {rows.dtype} {list(rows.shape)}"
            )
        rows = rows.to(self.device, non_blocking=True)
        self.encoder.reset(rows)
        self.decoder.reset(rows)
