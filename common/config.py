"""Typed configuration, split by concern. Each component takes only what it uses.

Validation raises ValueError with the numbers; nothing here asserts.
Pure Python at import time: torch/transformers are imported lazily.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")
QUANTIZATION_METHODS = (None, "fp8")
CHECKPOINT_QUANTIZATIONS = ("compressed-tensors", "fp8")
CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def from_fields(cls: type, value: dict[str, Any], name: str) -> Any:
    """`cls(**value)` for a dataclass given as a dict (an LLM keyword, or a field of a start-up
    message), refusing keys that are not its fields with a ValueError that names them."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{name} has unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**value)


def check_checkpoint_folder(model: str) -> None:
    """A model is a local HF checkpoint folder: nothing is fetched from a model hub."""
    import os
    if not os.path.isdir(model):
        raise ValueError(f"model {model!r} is not a local folder (give an HF checkpoint folder; "
                         f"nothing is downloaded from a model hub)")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"model {model!r} is not an HF checkpoint folder: it has no config.json")


@dataclass
class ModelConfig:
    model: str
    tokenizer: str | None = None
    dtype: str = "auto"            # resolved to one of float32/float16/bfloat16 by `resolve_dtype`
    max_model_len: int | None = None
    load_format: str = "auto"      # "auto" (safetensors) or "dummy" (random weights)
    seed: int = 0
    enforce_eager: bool = False    # True: no CUDA graphs
    quantization: str | None = None  # "fp8": quantize a 16/32-bit checkpoint's linear layers at load
    hf_config: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.model
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {self.load_format!r}")
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {self.quantization!r}")
        if self.hf_config is None:
            check_checkpoint_folder(self.model)
            from transformers import AutoConfig
            self.hf_config = AutoConfig.from_pretrained(self.model)
        self._check_checkpoint_quantization()
        limit = self.max_position_embeddings
        if self.max_model_len is None:
            self.max_model_len = limit
        elif self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        elif self.max_model_len > limit:
            raise ValueError(f"max_model_len ({self.max_model_len}) is above the model's position "
                             f"limit max_position_embeddings={limit}")

    def _check_checkpoint_quantization(self) -> None:
        """Refuse an unsupported quantized checkpoint here, before any worker starts (the loader
        checks the scheme itself in full): never load one as if it were 16-bit."""
        qc = getattr(self.hf_config, "quantization_config", None)
        if qc is None:
            return
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        method = getattr(method, "value", method)
        if method not in CHECKPOINT_QUANTIZATIONS:
            raise ValueError(f"the checkpoint's quantization_config.quant_method {method!r} is not supported "
                             f"(supported: {', '.join(CHECKPOINT_QUANTIZATIONS)} FP8 checkpoints, or "
                             f"quantization='fp8' on a 16/32-bit checkpoint)")

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
        # Reading `torch_dtype` warns in transformers 5 (`dtype` replaced it); older versions have only it.
        cfg = self.hf_config
        name = str((cfg.dtype if hasattr(cfg, "dtype") else getattr(cfg, "torch_dtype", None))
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
    # "auto": the model's dtype; "fp8" (= "fp8_e4m3"): e4m3 with per-tensor scales, half the bytes.
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {CACHE_DTYPES}, got {self.cache_dtype!r}")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 1 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two, got {bs}")
        if bs > 256:
            raise ValueError(f"block_size must be <= 256, got {bs}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")

    def check_device(self, device_type: str) -> None:
        """On CUDA only the block sizes the decode kernel and its graphs are built for."""
        from pagedray.kernels import CUDA_BLOCK_SIZES
        if device_type == "cuda" and self.block_size not in CUDA_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {CUDA_BLOCK_SIZES} on CUDA (the decode kernel's), "
                             f"got {self.block_size}")


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
    executor: str = "local"   # "local" (embedded, one process) or "ray"
    # Stages of contiguous layers, each on its own tensor_parallel_size ranks (rank = stage * tp + tp_rank).
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if self.executor == "local" and self.world_size != 1:
            raise ValueError(f"executor='local' runs one process: tensor_parallel_size and pipeline_parallel_size "
                             f"must be 1, got {self.tensor_parallel_size} and {self.pipeline_parallel_size} "
                             f"(use executor='ray')")

    @property
    def world_size(self) -> int:
        """Ranks of one replica: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def _is_cuda_index(device: str) -> bool:
    return device.startswith("cuda:") and device[5:].isdigit()


@dataclass
class DeviceConfig:
    device: str = "auto"   # "auto", "cpu", "cuda"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not _is_cuda_index(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.device == "auto":
            import torch
            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def check_present(self) -> None:
        """The device exists on this machine (for an engine on this process's own device)."""
        if self.device_type != "cuda":
            return
        import torch
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(self.device.split(":")[1]) if ":" in self.device else 0
        if index >= count:
            found = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(count)])
            why = "" if count else f" (torch {torch.__version__} sees no CUDA device)"
            raise ValueError(f"device {self.device!r} is not on this machine{why}; devices here: {found}")


_PREFILL_BACKENDS = ("triton", "triton_flash", "reference")
_ATTENTION_VARIANT_KEYS = ("SCORE_XPOSE", "PREFETCH", "TPG_MAX", "NUM_WARPS", "FP8_HALF2")
_PREFILL_VARIANT_KEYS = ("BLOCK_M", "BLOCK_N", "NUM_WARPS", "NUM_STAGES", "SPLIT", "NEW_KV")  # kernels/prefill_flash.py
_SKINNY_GEMM_MAX_M = 8   # rows the skinny GEMM kernel takes (kernels/gemv_cuda.MAX_M)


@dataclass
class KernelOptions:
    """Kernel and step tuning switches for A/B runs. They travel in the engine config to every
    worker (in-process, Ray actor, engine core in its own process), which installs them
    (`pagedray.kernels.options`) before it builds anything; the defaults are the measured best."""
    # Prefill and mixed steps on GPU: "triton" (kernels/prefill_triton.py), "triton_flash" (the
    # FlashAttention-style kernels/prefill_flash.py; benchmarks/prefill_attention.py) or the PyTorch "reference".
    # Triton: 341 us against 6.4 ms for the reference (H200, 8 prompts of 1024 tokens, 32/8x128 bf16).
    # triton_flash: 458 TFLOP/s against triton's 274 (H100, causal 4k, 32/8x128; 2026-12-05), and its
    # engine tests pass there; the 8B 1000 x 256/256 run moved 52.19 -> 52.65 req/s (prefill is short).
    prefill_backend: str = "triton_flash"
    # triton_flash's tile constants (BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES, SPLIT, NEW_KV); one not given
    # takes the kernel's default (prefill_flash.DEFAULT_VARIANT).
    prefill_variant: dict[str, int] = field(default_factory=dict)
    # Mixed steps: the leading decode rows through the decode kernel, the prompts through Triton.
    split_mixed_steps: bool = True
    # Linear layers at decode's few tokens: the skinny GEMM kernel instead of cuBLAS for at most
    # skinny_gemm_max_m tokens (on an H200 it beat cuBLAS at 1 and 2 tokens, lost from 4; benchmarks/gemv.py).
    skinny_gemm: bool = True
    skinny_gemm_max_m: int = 2
    # FP8 layers: at most this many tokens run the FP8-weight skinny GEMM (gemv_fp8.cu), more run
    # per-token quantization + cuBLASLt's FP8 GEMM (torch._scaled_mm); benchmarks/fp8.py.
    fp8_skinny_gemm_max_m: int = 4
    # Rotary + KV-cache write as one kernel (rotary.cu: rotary_and_cache); off: the two launches (same bits).
    fused_rotary_cache: bool = True
    # One-pass CUDA sampling (kernels/sample.cu) for greedy and temperature-only batches (benchmarks/sampling.py).
    fused_sampling: bool = True
    # Compile-time constants of paged_attention.cu fixed for every grid (SCORE_XPOSE, PREFETCH, TPG_MAX,
    # NUM_WARPS, FP8_HALF2); one not given takes the measured default for the grid (attention_cuda.variant).
    attention_variant: dict[str, int] = field(default_factory=dict)
    # The engine core's young-generation threshold of Python's cyclic GC (gc.set_threshold's first
    # value, raised to it, never lowered; 0: leave the interpreter's). A decode step at batch ~1000
    # allocates thousands of short-lived containers (reference counting frees them): at CPython's
    # 700 they set off a collection every ~700, and the full ones walk every running request's
    # token lists (1.2-3 ms a step and 20-50 ms pauses; benchmarks/host_overhead.py --gc-stats).
    gc_threshold: int = 50_000
    # LoRA layers: a forward of at least lora_dense_min_tokens tokens adds the adapters' deltas with dense
    # GEMMs over every device slot (kernels/lora.py: lora_path), fewer with the per-token Triton kernels
    # (each token reads only its own adapter); but a layer whose output is narrower than twice its input
    # (q/k/v, o, down) keeps the kernels from lora_narrow_kernels_min_tokens up to (not including)
    # _max_tokens. H100, 8 slots of rank 16, llama3-8b's layers (benchmarks/lora_kernels.py, 2026-12-05),
    # LoRA ms per forward over the base GEMMs, kernels / dense: 1.21 / 1.66 at 1 token, 3.08 / 1.67 at 2,
    # 6.41 / 1.71 at 8, 2.46 / 1.75 at 64; a layer at 256 tokens: o 9.2 / 12.2 us, gate_up 29.3 / 26.6.
    # 0: always dense.
    lora_dense_min_tokens: int = 2
    lora_narrow_kernels_min_tokens: int = 128
    lora_narrow_kernels_max_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.gc_threshold < 0:
            raise ValueError(f"gc_threshold must be >= 0, got {self.gc_threshold}")
        if self.lora_dense_min_tokens < 0:
            raise ValueError(f"lora_dense_min_tokens must be >= 0, got {self.lora_dense_min_tokens}")
        if not 0 <= self.lora_narrow_kernels_min_tokens <= self.lora_narrow_kernels_max_tokens:
            raise ValueError(f"need 0 <= lora_narrow_kernels_min_tokens <= lora_narrow_kernels_max_tokens, got "
                             f"{self.lora_narrow_kernels_min_tokens} and {self.lora_narrow_kernels_max_tokens}")
        if self.prefill_backend not in _PREFILL_BACKENDS:
            raise ValueError(f"prefill_backend must be one of {_PREFILL_BACKENDS}, got {self.prefill_backend!r}")
        if not 1 <= self.skinny_gemm_max_m <= _SKINNY_GEMM_MAX_M:
            raise ValueError(f"skinny_gemm_max_m must be in [1, {_SKINNY_GEMM_MAX_M}], got {self.skinny_gemm_max_m}")
        if not 0 <= self.fp8_skinny_gemm_max_m <= _SKINNY_GEMM_MAX_M:
            raise ValueError(f"fp8_skinny_gemm_max_m must be in [0, {_SKINNY_GEMM_MAX_M}], "
                             f"got {self.fp8_skinny_gemm_max_m}")
        unknown = set(self.attention_variant) - set(_ATTENTION_VARIANT_KEYS)
        if unknown:
            raise ValueError(f"attention_variant keys must be among {_ATTENTION_VARIANT_KEYS}, got {sorted(unknown)}")
        for name, value in self.attention_variant.items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"attention_variant[{name!r}] must be an integer >= 0, got {value!r}")
        unknown = set(self.prefill_variant) - set(_PREFILL_VARIANT_KEYS)
        if unknown:
            raise ValueError(f"prefill_variant keys must be among {_PREFILL_VARIANT_KEYS}, got {sorted(unknown)}")
        for name, value in self.prefill_variant.items():
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"prefill_variant[{name!r}] must be an integer >= 0, got {value!r}")

    @classmethod
    def of(cls, value: "KernelOptions | dict[str, Any] | None") -> "KernelOptions":
        """Options from LLM(kernel_options=...): the dataclass, its fields as a dict (as they arrive in
        an engine core's start-up message), or None for the defaults."""
        if value is None:
            return cls()
        return value if isinstance(value, cls) else from_fields(cls, value, "kernel_options")

    @classmethod
    def parse(cls, items: list[str]) -> "KernelOptions":
        """Options from command-line `name=value` items (e.g. `split_mixed_steps=0`,
        `attention_variant.NUM_WARPS=8`), for the benchmarks' --kernel-option."""
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for item in items:
            name, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"kernel option {item!r} must be name=value")
            if name.startswith(("attention_variant.", "prefill_variant.")):
                group, key = name.split(".", 1)
                values.setdefault(group, {})[key] = int(text)
            elif types.get(name) == "bool":
                if text.lower() not in ("0", "1", "true", "false"):
                    raise ValueError(f"kernel option {name} must be 0/1/true/false, got {text!r}")
                values[name] = text.lower() in ("1", "true")
            elif types.get(name) == "int":
                values[name] = int(text)
            else:
                values[name] = text
        return cls.of(values)
