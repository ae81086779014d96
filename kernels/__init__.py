"""Kernels: CUDA sources with CuPy launchers, and a PyTorch reference for each."""
import functools


@functools.cache
def cuda_available() -> bool:
    """True when CuPy and a CUDA device are usable (CUDA kernels are then used)."""
    try:
        import cupy  # noqa: F401
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False
