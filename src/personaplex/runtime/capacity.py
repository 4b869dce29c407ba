"""How many conversations fit on a GPU: decided by the KV cache, computed before serving."""

from __future__ import annotations

import torch

from ..model.config import LMConfig
from ..model.kv_cache import ring_capacity

# Kept free for activations, CUDA graphs, Mimi state and the allocator's slack (measured peak
# over weights + KV at 64 sessions on an H100: ~1.4 GB; doubled for safety).
RESERVED_BYTES = 3 * 2**30


def kv_bytes_per_session(config: LMConfig, kv_dtype: torch.dtype = torch.bfloat16) -> int:
    """Keys + values of every temporal layer for a full ring (context - 1 slots, as the
    reference attends): 1.57 GB in bf16 for the 7B."""
    element_bytes = torch.finfo(kv_dtype).bits // 8
    return config.num_layers * 2 * ring_capacity(config.context) * config.dim * element_bytes


def sessions_that_fit(config: LMConfig, free_bytes: int, kv_dtype: torch.dtype = torch.bfloat16,
                      reserved_bytes: int = RESERVED_BYTES) -> int:
    """Conversations whose full-context KV cache fits in `free_bytes` (after the weights are loaded)."""
    return max(0, (free_bytes - reserved_bytes) // kv_bytes_per_session(config, kv_dtype))


def free_gpu_bytes(device: torch.device | str | None = None) -> int:
    """Memory the KV caches can still get: free on the card plus what PyTorch's allocator holds
    but no tensor uses (e.g. bf16 weights just replaced by quantized ones)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
