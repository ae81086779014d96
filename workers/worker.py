"""What runs on each device. Start-up order is fixed:
init distributed → load the model shard → profile memory → allocate KV → capture graphs (and
warm the LM head up at every row count a step can sample).
"""
from __future__ import annotations

import logging

import torch

from pagedray.workers.cache_engine import CacheEngine, KVCacheSpec, kv_cache_torch_dtype
from pagedray.common.config import CacheConfig, DeviceConfig, KernelOptions, ModelConfig, ParallelConfig
from pagedray.kernels import options as kernel_option_state
from pagedray.common.lora import LoRAConfig, LoRARequest
from pagedray.common.messages import ModelRunnerOutput, SchedulerOutput
from pagedray.workers.model_runner import ModelRunner

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Worker:
    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig,
                 parallel_config: ParallelConfig, device_config: DeviceConfig,
                 max_num_batched_tokens: int, max_num_seqs: int, rank: int = 0,
                 distributed_init_method: str | None = None, local_device: str | None = None,
                 kernel_options: KernelOptions | None = None, speculative_config=None,
                 lora_config: LoRAConfig | None = None) -> None:
        # First: everything this worker builds (graphs included) runs with the engine config's options.
        kernel_option_state.install(kernel_options or KernelOptions())
        self.model_config = model_config
        self.cache_config = cache_config
        self.parallel_config = parallel_config
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.lora_config = lora_config
        self.rank = rank
        # The last stage's first TP rank samples and returns the step's output (rank = stage * tp + tp_rank).
        self.output_rank = (parallel_config.pipeline_parallel_size - 1) * parallel_config.tensor_parallel_size
        self.distributed_init_method = distributed_init_method
        self.device = torch.device(local_device or device_config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)  # a Ray actor sees its one GPU as device 0
        cache_config.check_device(self.device.type)   # also for a Worker built without build_engine_config
        self.dtype = DTYPES[model_config.resolve_dtype(self.device.type)]
        self.runner: ModelRunner | None = None
        self.cache: CacheEngine | None = None
        self.kv_spec: KVCacheSpec | None = None
        self.speculative_config = speculative_config

    # 1. distributed
    def init_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        pc = self.parallel_config
        if pc.world_size > 1:
            import torch.distributed as dist

            from pagedray.models.layers.distributed import init_model_parallel
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=self.distributed_init_method,
                                    rank=self.rank, world_size=pc.world_size)
            init_model_parallel(pc.tensor_parallel_size, pc.pipeline_parallel_size)
        torch.manual_seed(self.model_config.seed)

    # 2. load
    def load_model(self) -> None:
        from pagedray.models import get_kv_cache_spec, get_model
        from pagedray.models.layers.pipeline import current_stage, stage_layer_range
        mc = self.model_config
        model = get_model(mc.hf_config, mc.model, self.dtype, self.device, mc.load_format, mc.seed,
                          quantization=mc.quantization)
        num_layers, kv_heads, head_size = get_kv_cache_spec(
            mc.hf_config, self.parallel_config.tensor_parallel_size)
        kv_dtype = kv_cache_torch_dtype(self.cache_config.cache_dtype, self.dtype, self.device)
        stage = current_stage()   # this rank's KV cache holds only its stage's layers
        start, end = stage_layer_range(num_layers, stage.index, stage.num_stages)
        self.kv_spec = KVCacheSpec(end - start, kv_heads, head_size, self.cache_config.block_size, kv_dtype)
        self.runner = ModelRunner(model, self.cache_config.block_size, self.device, mc.seed,
                                  sample=self.rank == self.output_rank, stage=stage)
        if self.lora_config is not None:   # before profiling: the slots take memory and time
            from pagedray.workers.lora import LoRAManager
            # (its token buffers also cover the largest decode graph: a verification runs k + 1 rows)
            self.runner.lora = LoRAManager(model, self.lora_config,
                                           max(self.max_num_batched_tokens, self._max_decode_rows()), self.dtype,
                                           self.device)
        if self.speculative_config is not None:
            from pagedray.workers.spec_decode import make_spec_runner
            self.runner.spec = make_spec_runner(self)
        if self.runner.sample:   # the sampling rank (the last stage's first): grammar masks and logit biases
            from pagedray.workers.structured_output import LogitsConstraints, backend_for
            self.runner.sampler.constraints = LogitsConstraints(backend_for(mc.tokenizer, mc.vocab_size))

    # 3. profile
    def num_kv_blocks(self) -> int:
        """The KV blocks to allocate on this rank: CacheConfig.num_kv_blocks when set, else profiled."""
        if self.cache_config.num_kv_blocks is not None:
            return self.cache_config.num_kv_blocks
        return self.determine_num_available_blocks()

    kv_budget_detail = ""   # the last profile's figures, for the executor's error

    def determine_num_available_blocks(self) -> int:
        """KV blocks this rank can afford after a worst-case forward."""
        spec = self.kv_spec
        needed = self.max_num_seqs * -(-self.model_config.max_model_len // spec.block_size)
        if self.device.type != "cuda":
            affordable = self.cache_config.cpu_kv_cache_bytes // self._bytes_per_block()
            return max(1, min(affordable, needed + 1))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.runner.profile_run(self.max_num_batched_tokens, self.max_num_seqs,
                                CacheEngine.empty_caches(spec, self.device),
                                max_seq_len=self.model_config.max_model_len)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        # Everything outside this process's allocator: the CUDA context, NCCL buffers, and
        # other processes on the same GPU (they are not ours to take).
        outside = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.cache_config.gpu_memory_utilization - peak - outside
        graphs = self.graph_memory_reserve()
        budget -= graphs
        num_blocks = int(budget // self._bytes_per_block())
        gib = 2**30
        # The figures the executor's "no memory left" error names (one of them is the culprit).
        self.kv_budget_detail = (f"; rank {self.rank}: {total / gib:.2f} GiB total, peak allocated "
                                 f"{peak / gib:.2f} GiB (weights + the profile forward), outside this "
                                 f"process's allocator {outside / gib:.2f} GiB, graph reserve "
                                 f"{graphs / gib:.2f} GiB -> KV budget {budget / gib:.2f} GiB")
        logger.info("rank %d: peak %.2f GiB, KV budget %.2f GiB -> %d blocks", self.rank,
                    peak / gib, budget / gib, num_blocks)
        torch.cuda.empty_cache()
        return max(0, num_blocks)

    def _max_decode_rows(self) -> int:
        """Rows of the largest decode step: a verification runs k + 1 rows per sequence."""
        spec = self.speculative_config
        return self.max_num_seqs * (1 + (spec.num_speculative_tokens if spec is not None else 0))

    def _bytes_per_block(self) -> int:
        """A block's KV bytes on this rank: the target's, plus a drafter's (speculative decoding)."""
        spec = self.runner.spec
        return self.kv_spec.bytes_per_block + (spec.draft_bytes_per_block if spec is not None else 0)

    def graph_memory_reserve(self) -> int:
        """Bytes kept back for the decode graphs, captured after the KV cache exists.

        Their private pool holds the activations of the largest bucket's forward:
        measured here by a decode-sized profile forward, plus slack for graph objects.
        """
        if not self.graphs_enabled():
            return 0
        from pagedray.workers.cuda_graphs import graph_batch_sizes
        largest = graph_batch_sizes(self._max_decode_rows())[-1]
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.runner.profile_run(largest, largest, CacheEngine.empty_caches(self.kv_spec, self.device),
                                max_seq_len=self.model_config.max_model_len)
        torch.cuda.synchronize(self.device)
        reserve = torch.cuda.max_memory_allocated(self.device) - base + (64 << 20)
        # A draft model captures its own graphs, of no larger a model: at most as much again.
        return reserve * (2 if self.runner.spec is not None and self.runner.spec.has_draft_graphs else 1)

    # 4. allocate
    def initialize_cache(self, num_blocks: int) -> None:
        self.cache = CacheEngine(self.kv_spec, num_blocks, self.device)
        self.runner.kv_caches = self.cache.kv_caches
        if self.runner.spec is not None:
            self.runner.spec.allocate_cache(num_blocks, self.device)

    # 5. graphs
    def graphs_enabled(self) -> bool:
        from pagedray.kernels import cuda_available
        return (self.device.type == "cuda" and not self.model_config.enforce_eager
                and self.parallel_config.pipeline_parallel_size == 1 and cuda_available())

    def capture_graphs(self) -> None:
        """Decode graphs per batch bucket, now that the KV cache exists; on CUDA, graphs or not,
        the LM head's kernels are loaded first (ModelRunner.warm_up_logits)."""
        self.runner.warm_up_logits(self._max_decode_rows())
        if self.runner.spec is not None:
            self.runner.spec.drafter_end_step()     # (EAGLE-3's hooks saw the profile forwards)
        if not self.graphs_enabled() or (self.runner.spec is not None and self.runner.spec.needs_eager_target):
            return
        from pagedray.workers.cuda_graphs import graph_batch_sizes
        self.runner.capture_graphs(graph_batch_sizes(self._max_decode_rows()), self.model_config.max_model_len)
        if self.runner.spec is not None:
            self.runner.spec.capture_graphs(self.max_num_seqs, self.model_config.max_model_len,
                                            self.cache_config.block_size, self.device)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        out = self.runner.execute_model(sched)
        return out if self.rank == self.output_rank else None

    # LoRA adapters (ValueError when LoRA is off or the adapter does not fit the model)
    def add_lora(self, lora_request: LoRARequest) -> bool:
        if self.runner.lora is None:
            raise ValueError("LoRA is not enabled: start the engine with enable_lora=True")
        return self.runner.lora.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.runner.lora is not None and self.runner.lora.remove_lora(lora_int_id)

    def shutdown(self) -> None:
        import torch.distributed as dist

        from pagedray.models.layers.distributed import reset_model_parallel
        if dist.is_initialized():
            dist.destroy_process_group()
        reset_model_parallel()
        self._release_device_memory()

    def _release_device_memory(self) -> None:
        """Give the weights, KV cache and graph pools back now, not whenever the collector finds the
        worker: a process that builds one engine after another (tests, notebooks, a replica restarting
        in its actor) profiles the next one's KV budget against what this one still holds."""
        import gc

        self.runner = None
        self.cache = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
