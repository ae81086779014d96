"""This worker's slice of the paged KV cache: one tensor per layer.

Layout per layer: [2 (K, V), num_blocks, num_kv_heads_per_rank, block_size, head_size].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def kv_cache_torch_dtype(cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """CacheConfig.cache_dtype as a torch dtype: "auto" is the model's; "fp8" is e4m3 (1 byte a value,
    so a block of the same bytes holds twice the tokens of a 16-bit cache)."""
    if cache_dtype == "auto":
        return model_dtype
    if device.type == "cuda":
        from pagedray.kernels.fp8 import check_fp8_supported
        check_fp8_supported(device)
        if model_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"kv_cache_dtype={cache_dtype!r} on CUDA needs a float16 or bfloat16 model "
                             f"(the FP8 cache kernels widen into 16-bit), got dtype {model_dtype}")
    return torch.float8_e4m3fn


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int   # on this rank
    head_size: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.block_size * self.head_size * elem


class CacheEngine:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (2, num_blocks, spec.num_kv_heads, spec.block_size, spec.head_size)
        # Zeroed so that never-written slots hold finite numbers (masked keys times 0 stay 0).
        self.kv_caches = [torch.zeros(shape, dtype=spec.dtype, device=device)
                          for _ in range(spec.num_layers)]

    @staticmethod
    def empty_caches(spec: KVCacheSpec, device: torch.device) -> list[torch.Tensor]:
        """Placeholders for the profiling forward (attention then runs without a cache)."""
        return [torch.empty(0, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
