"""Triton kernels for quantized linear layers (CUDA only; import triton only through here)."""
