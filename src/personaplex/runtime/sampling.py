"""Token sampling with per-row settings, on the device, without host synchronisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """The reference defaults; `greedy` takes the argmax everywhere."""

    audio_temperature: float = 0.8
    audio_top_k: int = 250
    text_temperature: float = 0.7
    text_top_k: int = 25
    greedy: bool = False

    def __post_init__(self) -> None:
        if self.audio_temperature < 0 or self.text_temperature < 0:
            raise ValueError("sampling temperatures must be >= 0")
        if self.audio_top_k < 1 or self.text_top_k < 1:
            raise ValueError("top-k must be >= 1")


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    max_top_k: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of logits [B, V]: top-k sampling at each row's temperature; argmax
    where the temperature is 0. `max_top_k` is a Python int (static shapes for CUDA graphs);
    each row keeps its own first `top_k[b]` candidates.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    safe_temperature = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / safe_temperature[:, None], dim=-1)
    top_probs, top_ids = probs.topk(min(max_top_k, logits.shape[-1]), dim=-1)
    rank = torch.arange(top_probs.shape[-1], device=logits.device)
    top_probs = torch.where(rank[None, :] < top_k[:, None], top_probs, torch.zeros_like(top_probs))
    # Sampling proportionally to p is argmax(p / E) with E ~ Exp(1): no multinomial, no sync.
    noise = torch.empty_like(top_probs).exponential_(1.0, generator=generator)
    sampled = top_ids.gather(-1, (top_probs / noise).argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, sampled, greedy)
