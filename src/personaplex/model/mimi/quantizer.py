"""Mimi's split residual vector quantizer.

Level 0 (semantic) and levels 1.. (acoustic) are two residual VQs with their own 1x1
projections; both read the same latent and their decodings are summed. Each codebook is
stored as trained, as an EMA pair: vectors = embedding_sum / max(cluster_usage, 1e-5).
Only the levels in use are built; the checkpoint's others are skipped at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Upstream's EuclideanCodebook epsilon: a dead code (usage 0, sum 0) decodes to zeros.
USAGE_EPSILON = 1e-5


class Codebook(nn.Module):
    def __init__(self, bins: int, dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.register_buffer("embedding_sum", torch.empty(bins, dim, device=device, dtype=dtype))
        self.register_buffer("cluster_usage", torch.empty(bins, device=device, dtype=dtype))

    def vectors(self) -> torch.Tensor:
        """[bins, dim] codebook vectors."""
        return self.embedding_sum / self.cluster_usage.clamp(min=USAGE_EPSILON)[:, None]


class ResidualVQ(nn.Module):
    """[B, input_dim, T] -> codes [B, K, T] and back, through a `dim`-wide code space."""

    def __init__(self, num_levels: int, bins: int, dim: int, input_dim: int, output_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_proj = nn.Conv1d(input_dim, dim, 1, bias=False, **factory)
        self.output_proj = nn.Conv1d(dim, output_dim, 1, bias=False, **factory)
        self.layers = nn.ModuleList([Codebook(bins, dim, **factory) for _ in range(num_levels)])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.input_proj(x)
        batch, dim, steps = residual.shape
        codes = []
        for codebook in self.layers:
            vectors = codebook.vectors()
            flat = residual.transpose(1, 2).reshape(-1, dim)
            # cdist, not a hand-written distance: codes must tie-break exactly like upstream.
            level = torch.cdist(flat[None], vectors[None], p=2)[0].argmin(dim=-1).view(batch, steps)
            residual = residual - F.embedding(level, vectors).transpose(1, 2)
            codes.append(level)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        quantized = F.embedding(codes[:, 0], self.layers[0].vectors())
        for level in range(1, codes.shape[1]):
            quantized = quantized + F.embedding(codes[:, level], self.layers[level].vectors())
        return self.output_proj(quantized.transpose(1, 2))


class SplitResidualVQ(nn.Module):
    """One semantic level (`rvq_first`) + `num_codebooks - 1` acoustic levels (`rvq_rest`)."""

    def __init__(self, num_codebooks: int, bins: int, dim: int, input_dim: int, output_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        if num_codebooks < 2:
            raise ValueError(f"Mimi needs at least 2 codebooks (1 semantic + acoustic), got {num_codebooks}")
        shape = {"bins": bins, "dim": dim, "input_dim": input_dim, "output_dim": output_dim, "device": device, "dtype": dtype}
        self.rvq_first = ResidualVQ(1, **shape)
        self.rvq_rest = ResidualVQ(num_codebooks - 1, **shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.rvq_first.input_proj.weight.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, input_dim, T] -> codes [B, num_codebooks, T] int64."""
        x = x.to(self.dtype)
        return torch.cat([self.rvq_first.encode(x), self.rvq_rest.encode(x)], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, K, T], 1 <= K <= num_codebooks -> [B, output_dim, T]."""
        quantized = self.rvq_first.decode(codes[:, :1])
        if codes.shape[1] > 1:
            quantized = quantized + self.rvq_rest.decode(codes[:, 1:])
        return quantized
