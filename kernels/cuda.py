"""The CUDA kernels' launchers in one namespace (CuPy/NVRTC kernels; the prefill kernel is Triton).

Each launcher checks shapes, dtypes, layouts and devices first and raises ValueError naming the
argument; kernels run on PyTorch's current stream and are compiled once per device and dtype.
Importing this module needs no GPU; calling a launcher needs CuPy and a CUDA device.
"""
from pagedray.kernels.attention_cuda import paged_attention_decode
from pagedray.kernels.cache_ops import copy_blocks, reshape_and_cache
from pagedray.kernels.elementwise import (fused_add_rms_norm, gelu_and_mul, rms_norm, rotary_embedding,
                                          rotary_embedding_and_cache, silu_and_mul)

__all__ = ["paged_attention_decode", "reshape_and_cache", "copy_blocks", "rms_norm", "fused_add_rms_norm",
           "rotary_embedding", "rotary_embedding_and_cache", "silu_and_mul", "gelu_and_mul"]


def paged_prefill(*args, **kwargs):
    """Triton paged prefill (imported on first use: Triton is optional)."""
    from pagedray.kernels.prefill_triton import paged_prefill as impl
    return impl(*args, **kwargs)
