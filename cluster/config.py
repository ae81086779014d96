"""Driver-side configuration; re-exports the worker-side dataclasses."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedray.common.config import CacheConfig, DeviceConfig, KernelOptions, ModelConfig, ParallelConfig
from pagedray.common.speculative import SpeculativeConfig
from pagedray.common.lora import LoRAConfig

__all__ = ["CacheConfig", "DeviceConfig", "KernelOptions", "ModelConfig", "ParallelConfig", "SchedulerConfig",
           "EngineConfig"]


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None   # None: chosen from max_model_len and chunking
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    # Overlap the host with the device: schedule and launch step N+1 before reading step N's
    # sampled ids (vLLM V1's async scheduling). None: on for one local CUDA worker.
    async_scheduling: bool | None = None
    # Prefill pacing (cluster/core/step_pacing.py): size the prefill admitted next to running decodes
    # from measured step times so that the running streams' mean step time stays near this multiple
    # of a decode-only step at their batch. None: off (the token budget alone decides, as vLLM).
    tpot_target_ratio: float | None = None
    # Pacing never holds a prompt back longer than this after its arrival (bounds the added TTFT).
    max_prefill_delay_ms: float = 250.0
    # Pacing gives a step no prefill rather than a chunk smaller than this (each mixed step has a
    # fixed cost); a smaller pending prompt still goes whole.
    min_prefill_chunk_tokens: int = 64

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        self._check_pacing()
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = (max(2048, self.max_num_seqs) if self.enable_chunked_prefill
                                           else max(self.max_model_len, self.max_num_seqs))
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller than max_model_len "
                f"({self.max_model_len}) with chunked prefill off: long prompts could never run")

    def _check_pacing(self) -> None:
        ratio = self.tpot_target_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                                  or not 1.0 < ratio <= 100.0):
            raise ValueError(f"tpot_target_ratio must be a number in (1, 100] or None (off), got {ratio!r}")
        delay = self.max_prefill_delay_ms
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0.0 < delay <= 600_000.0:
            raise ValueError(f"max_prefill_delay_ms must be in (0, 600000] ms, got {delay!r}")
        chunk = self.min_prefill_chunk_tokens
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"min_prefill_chunk_tokens must be an integer >= 1, got {chunk!r}")


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    parallel: ParallelConfig
    scheduler: SchedulerConfig
    device: DeviceConfig
    kernel: KernelOptions = field(default_factory=KernelOptions)
    speculative: SpeculativeConfig | None = None
    lora: LoRAConfig | None = None   # None: LoRA off (enable_lora=False)


def build_engine_config(model: str, *, tokenizer: str | None = None, dtype: str = "auto",
                        device: str = "auto", tensor_parallel_size: int = 1, executor: str = "local",
                        block_size: int = 16, num_kv_blocks: int | None = None,
                        gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                        max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                        enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                        load_format: str = "auto", seed: int = 0,
                        enforce_eager: bool = False, async_scheduling: bool | None = None,
                        quantization: str | None = None, kv_cache_dtype: str = "auto",
                        kernel_options: KernelOptions | dict[str, Any] | None = None,
                        speculative_config: dict | SpeculativeConfig | None = None,
                        enable_lora: bool = False, max_loras: int = 1, max_lora_rank: int = 16,
                        max_cpu_loras: int | None = None,
                        pipeline_parallel_size: int = 1, tpot_target_ratio: float | None = None,
                        max_prefill_delay_ms: float = 250.0,
                        min_prefill_chunk_tokens: int = 64) -> EngineConfig:
    """The LLM(...) keywords, split into the per-concern configs."""
    model_config = ModelConfig(model, tokenizer, dtype, max_model_len, load_format, seed, enforce_eager,
                               quantization)
    parallel = ParallelConfig(tensor_parallel_size, executor, pipeline_parallel_size)
    device_config = DeviceConfig(device)
    check_pipeline_fits(model_config, parallel)
    local = parallel.executor == "local" and parallel.world_size == 1
    if parallel.executor == "local":
        device_config.check_present()   # Ray workers check their own node's devices
    speculative = _speculative(speculative_config, model_config, parallel.tensor_parallel_size)
    if async_scheduling is None:
        # Speculation too, n-gram included: measured on an H100 (8B, batch 1, k=4, spec_decode.py
        # --overlap --backoff-off-too, 2026-12-05) overlapped beat serial steps with every proposal
        # accepted (1.43 vs 1.48 ms/token) and with none (back-off on: 5.89 vs 6.74; plain 5.78).
        async_scheduling = local and device_config.device_type == "cuda"
    elif async_scheduling and not local:
        raise ValueError(f"async_scheduling needs the local executor at tensor_parallel_size=1, got "
                         f"executor={executor!r}, tensor_parallel_size={tensor_parallel_size}, "
                         f"pipeline_parallel_size={pipeline_parallel_size}")
    cache = CacheConfig(block_size, gpu_memory_utilization, num_kv_blocks, enable_prefix_caching,
                        cache_dtype=kv_cache_dtype)
    cache.check_device(device_config.device_type)
    if parallel.pipeline_parallel_size > 1 and (enable_lora or speculative is not None):
        raise ValueError(f"pipeline_parallel_size={parallel.pipeline_parallel_size} cannot be combined with "
                         f"{'enable_lora' if enable_lora else 'speculative_config'} yet (only plain decoding "
                         f"runs in stages)")
    return EngineConfig(
        model=model_config,
        cache=cache,
        parallel=parallel,
        scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, model_config.max_model_len,
                                  enable_chunked_prefill, async_scheduling, tpot_target_ratio,
                                  max_prefill_delay_ms, min_prefill_chunk_tokens),
        device=device_config,
        kernel=KernelOptions.of(kernel_options),
        speculative=speculative,
        lora=LoRAConfig(max_loras, max_lora_rank, max_cpu_loras) if enable_lora else None,
    )


def _speculative(value, model_config: ModelConfig, tp_size: int) -> SpeculativeConfig | None:
    """The validated speculative config."""
    spec = SpeculativeConfig.from_dict(value)
    if spec is None:
        return None
    if spec.uses_draft_model:
        from transformers import AutoConfig
        draft = AutoConfig.from_pretrained(spec.model)
        spec.check_target(model_config.hf_config, draft)
        spec.check_tensor_parallel(draft, tp_size)
    return spec


def check_pipeline_fits(model_config: ModelConfig, parallel: ParallelConfig) -> None:
    """Every pipeline stage needs at least one layer."""
    pp = parallel.pipeline_parallel_size
    layers = getattr(model_config.hf_config, "num_hidden_layers", None)
    if pp > 1 and isinstance(layers, int) and layers < pp:
        raise ValueError(f"pipeline_parallel_size ({pp}) is larger than the model's num_hidden_layers "
                         f"({layers}): every stage needs at least one layer")
