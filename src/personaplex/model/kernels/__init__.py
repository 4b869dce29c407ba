"""GPU kernels (CUDA only; import triton only through here), registered as torch custom ops: Triton's,
and one in CUDA C compiled at run time (`int4_mma.py`)."""

from __future__ import annotations

import enum
import functools
import os

import torch


class WeightKind(enum.IntEnum):
    """The weight formats the quantized-matmul kernel reads (one of its compile-time constants)."""

    INT4 = 0
    INT8 = 1
    FP8 = 2
    PLAIN = 3  # not quantized: weights in a float dtype, read as they are
    INT4_MMA = 4  # int4 in the tensor-core kernel's fragment order (`int4_mma.py`, CUDA C, not Triton)


# A layer's arguments to the quantized-matmul ops after x: weight, scales, biases, the
# `WeightKind` value and the group size (`layers.kernel_operands`).
KernelOperands = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None", int, int]

# Products of up to this many rows take the GEMV kernel (each weight tile read once for all
# rows, in registers; it holds one accumulator per row, so two is its limit), more take the
# tensor cores. Two covers one conversation's Mimi transformer (two 25 Hz steps a frame) and
# two conversations' LM frames.
GEMV_MAX_ROWS = 2

# The sampling kernel's program searches a part of at most this many candidates of a row (16
# per thread at 4 warps); the fused depformer frame draws its tokens from one such part a row.
SAMPLING_PART_WIDTH = 2048


def device_index(device: torch.device) -> int:
    """The index of a CUDA device (the current one for a bare "cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def multiprocessors(index: int) -> int:
    """How many SMs CUDA device `index` has: the kernels size their grids by it."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def register_cuda_ops() -> None:
    """Import the kernels' modules, which register them as torch custom ops (CUDA machines
    only: they import Triton)."""
    from . import fused_depformer, quantized_matmul, ring_attention, sampling  # noqa: F401


def kernels_can_run(tensor: torch.Tensor) -> bool:
    """Whether our Triton kernels can take `tensor`: on CUDA, and on the CPU when Triton's
    interpreter is on (TRITON_INTERPRET=1, as the CPU tests set it), so that the model takes
    the GPU's path there too, slowly. Never the interpreter inside a compiled frame."""
    if tensor.is_cuda:
        return True
    return not torch.compiler.is_compiling() and os.environ.get("TRITON_INTERPRET") == "1"


def cuda_op(name: str) -> torch._ops.OpOverloadPacket:
    """`torch.ops.personaplex.<name>`, registering the kernels on first use.

    Under torch.compile the op is only looked up (the frame runner registers the kernels
    before it compiles): an import inside the traced code would hand the compiler an object
    it cannot follow back to a module, and it refuses those."""
    if not torch.compiler.is_compiling():
        register_cuda_ops()
    return getattr(torch.ops.personaplex, name)
