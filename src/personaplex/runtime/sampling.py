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

    Each row has a seed and a draw counter; a draw hashes (seed, counter) with splitmix64
    into the row's key, which `gumbel_noise` (or the sampling kernel) hashes with each
    candidate's index. A conversation's samples therefore depend on its own seed only, whichever
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

    def next_keys(self, draws: int | None = None) -> torch.Tensor:
        """This draw's noise key [B] int64 for every row, then advance every row's counter; with
        `draws`, the keys of that many draws in turn [B, draws] (the same keys as that many
        calls), and the counters advance past them all."""
        counters = self.draws if draws is None else self.draws[:, None] + torch.arange(draws, device=self.draws.device)
        seeds = self.seeds if draws is None else self.seeds[:, None]
        keys = _splitmix64(seeds * 0x2545F4914F6CDD1D + counters * 0x9E3779B97F4A7C15)
        self.draws += 1 if draws is None else draws
        return keys


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 (wrapping multiplies; shifts masked to be logical)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as a signed int64
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * -7723592293110705685  # 0x94d049bb133111eb
    return x ^ ((x >> 31) & ((1 << 33) - 1))


_LOW32 = (1 << 32) - 1


def gumbel_noise(row_keys: torch.Tensor, candidates: int) -> torch.Tensor:
    """Gumbel noise [B, candidates] float32 from each row's key: the key's low half plus the
    candidate's index, xor its high half, through murmur3's 32-bit finaliser gives u, an odd
    multiple of 2^-24 in (0, 1); the noise is -log(-log(u)). The sampling kernel computes the
    same numbers (in int64 here, each sum and product masked to its low 32 bits, as uint32 wraps)."""
    index = torch.arange(candidates, device=row_keys.device)
    low, high = row_keys & _LOW32, (row_keys >> 32) & _LOW32
    bits = _fmix32(((low[:, None] + index) & _LOW32) ^ high[:, None])
    uniform = ((bits >> 9).float() * 2.0 + 1.0) * 2.0**-24
    return -torch.log(-torch.log(uniform))


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on values below 2^32 held in int64."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _LOW32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _LOW32
    return h ^ (h >> 16)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, noise: RowNoise,
                  kernels: Kernels = READABLE_KERNELS) -> torch.Tensor:
    """One token per row of logits [B, V]: top-k sampling at each row's temperature; argmax
    where the temperature is 0. Each row keeps the tokens whose scaled logit is at least its
    own `top_k[b]`-th largest (ties at that value are all kept; the reference's torch.topk
    keeps k of them, and exact ties are all but absent) and draws among them by the
    Gumbel-max trick: argmax of scaled logit + Gumbel noise, which samples the softmax of the
    kept logits as the reference's multinomial does, with no host synchronisation. No shape
    depends on a row's settings, so one compiled and captured frame serves any top-k a
    conversation asks for (a larger static size would cost a new compilation of the frame).

    With `kernels.sampling` one Triton kernel does it all (`model/kernels/sampling.py`);
    the code below is what it computes."""
    row_keys = noise.next_keys()
    if kernels.sampling and kernels_can_run(logits):
        return cuda_op("sample_top_k")(logits, temperature, top_k, row_keys)
    values = logits.float()
    greedy = values.argmax(dim=-1)
    scaled = values / torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
    ranked = scaled.sort(dim=-1, descending=True).values
    threshold = ranked.gather(-1, (top_k.clamp(1, scaled.shape[-1]) - 1)[:, None])
    scores = torch.where(scaled >= threshold, scaled + gumbel_noise(row_keys, scaled.shape[-1]), float("-inf"))
    return torch.where(temperature > 0, scores.argmax(dim=-1), greedy)
