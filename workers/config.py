"""Typed configuration, split by concern. Each component takes only what it uses.

Validation raises ValueError with the numbers; nothing here asserts.
Pure Python at import time: torch/transformers are imported lazily.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class ModelConfig:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"            # resolved to one of float32/float16/bfloat16 by `resolve_dtype`
    max_model_len: int | None = None
    load_format: str = "auto"      # "auto" (safetensors) or "dummy" (random weights)
    seed: int = 0
    enforce_eager: bool = False    # True: no CUDA graphs
    hf_config: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.model
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.hf_config is None:
            from transformers import AutoConfig
            self.hf_config = AutoConfig.from_pretrained(self.model)
        limit = self.max_position_embeddings
        if self.max_model_len is None:
            self.max_model_len = limit
        elif self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        elif self.max_model_len > limit:
            raise ValueError(f"max_model_len ({self.max_model_len}) is above the model's position "
                             f"limit max_position_embeddings={limit}")

    @property
    def max_position_embeddings(self) -> int:
        cfg = self.hf_config
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or []
        if not archs:
            raise ValueError(f"the config of {self.model} names no architectures")
        return archs[0]

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    def resolve_dtype(self, device_type: str) -> str:
        """'auto' means the checkpoint's dtype on GPU, float32 on CPU (exact parity there)."""
        if self.dtype != "auto":
            return self.dtype
        if device_type == "cpu":
            return "float32"
        name = str(getattr(self.hf_config, "torch_dtype", None) or getattr(self.hf_config, "dtype", None)
                   or "float16").replace("torch.", "")
        return "float16" if name == "float32" else name


@dataclass
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None      # overrides profiling when set
    enable_prefix_caching: bool = True
    # On CPU there is no device memory to profile: this many bytes are given to the KV cache.
    cpu_kv_cache_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        bs = self.block_size
        if not isinstance(bs, int) or bs < 1 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two, got {bs}")
        if bs > 256:
            raise ValueError(f"block_size must be <= 256, got {bs}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    executor: str = "local"   # "local" (embedded, one process) or "ray"

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if self.executor == "local" and self.tensor_parallel_size != 1:
            raise ValueError(f"executor='local' runs one process: tensor_parallel_size must be 1, "
                             f"got {self.tensor_parallel_size} (use executor='ray')")


@dataclass
class DeviceConfig:
    device: str = "auto"   # "auto", "cpu", "cuda"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "auto":
            import torch
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]
