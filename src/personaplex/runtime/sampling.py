"""Token sampling with per-row settings, on the device, without host synchronisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.kernels import cuda_op, kernels_can_run
from ..model.layers import READABLE_KERNELS, Kernels


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


class RowNoise:
    """Per-row random streams for sampling, counter-based so that they live on the device.

    Each row has a seed and a draw counter; a draw hashes (seed, counter, candidate) with
    splitmix64. A conversation's samples therefore depend on its own seed only, whichever
    batch it runs in and whichever rows come and go beside it, and the state is two small
    tensors that a CUDA graph updates in place.
    """

    def __init__(self, batch_size: int, device: torch.device | str):
        self.seeds = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.draws = torch.zeros(batch_size, dtype=torch.long, device=device)

    def reseed(self, rows: slice | torch.Tensor, seed: int | None) -> None:
        """Restart the rows' streams from `seed` (a random one when None)."""
        value = int(torch.randint(0, 2**62, ())) if seed is None else seed
        self.seeds[rows] = value
        self.draws[rows] = 0

    def exponential(self, candidates: int) -> torch.Tensor:
        """Exp(1) noise [B, candidates], then advance every row's counter."""
        index = torch.arange(candidates, device=self.seeds.device)
        mixed = _splitmix64(self.seeds[:, None] * 0x2545F4914F6CDD1D + self.draws[:, None] * 0x9E3779B97F4A7C15 + index)
        uniform = ((mixed >> 11) & ((1 << 53) - 1)).double().add_(0.5).div_(2.0**53)  # in (0, 1)
        self.draws += 1
        return (-torch.log(uniform)).float()


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 (wrapping multiplies; shifts masked to be logical)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, noise: RowNoise,
                  kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
    """One token per row of logits [B, V]: top-k sampling at each row's temperature; argmax
    where the temperature is 0. Each row keeps the tokens whose probability is at least its
    own `top_k[b]`-th largest (ties at that value are all kept; the reference's torch.topk
    keeps k of them, and exact ties between probabilities are all but absent). No shape
    depends on a row's settings, so one compiled and captured frame serves any top-k a
    conversation asks for (a conversation joining with a larger one costs nothing, where a
    larger static size would cost a new compilation of the frame)."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    safe_temperature = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / safe_temperature[:, None], dim=-1)
    kept = probs >= kth_largest_probability(probs, top_k, kernels)[:, None]
    # Sampling proportionally to p is argmax(p / E) with E ~ Exp(1): no multinomial, no sync.
    sampled = (torch.where(kept, probs, torch.zeros_like(probs)) / noise.exponential(probs.shape[-1])).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


def kth_largest_probability(probs: torch.Tensor, top_k: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """Each row's top_k[b]-th largest probability [B] (top_k clamped to 1..V): by sorting the
    row, or with `kernels.kth_largest` by one Triton kernel that finds the same value
    without sorting (`model/kernels/top_k.py`)."""
    if kernels.kth_largest and kernels_can_run(probs):
        return cuda_op("kth_largest")(probs, top_k)
    ranked = probs.sort(dim=-1, descending=True).values
    return ranked.gather(-1, (top_k.clamp(1, probs.shape[-1]) - 1)[:, None])[:, 0]
