"""The offline API, shaped like vLLM's so users can switch."""
from __future__ import annotations

import itertools
from typing import Sequence

from pagedray.cluster.engine import LLMEngine
from pagedray.cluster.outputs import RequestOutput
from pagedray.common.config import KernelOptions
from pagedray.common.lora import LoRARequest
from pagedray.common.sampling_params import SamplingParams

Prompt = str | dict


class LLM:
    def __init__(self, model: str | None = None, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", tensor_parallel_size: int = 1, executor: str = "local",
                 block_size: int = 16, num_kv_blocks: int | None = None,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 load_format: str = "auto", seed: int = 0, enforce_eager: bool = False,
                 async_scheduling: bool | None = None, quantization: str | None = None,
                 kv_cache_dtype: str = "auto", kernel_options: KernelOptions | dict | None = None,
                 speculative_config: dict | None = None, enable_lora: bool = False, max_loras: int = 1,
                 max_lora_rank: int = 16, max_cpu_loras: int | None = None,
                 pipeline_parallel_size: int = 1, tpot_target_ratio: float | None = None,
                 max_prefill_delay_ms: float = 250.0, min_prefill_chunk_tokens: int = 64) -> None:
        if model is None:
            from pagedray.cluster.default_model import default_model_path
            model = default_model_path()
        self.llm_engine = LLMEngine.from_kwargs(
            model, tokenizer=tokenizer, dtype=dtype, device=device,
            tensor_parallel_size=tensor_parallel_size, executor=executor, block_size=block_size,
            num_kv_blocks=num_kv_blocks, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
            enable_chunked_prefill=enable_chunked_prefill, load_format=load_format, seed=seed,
            enforce_eager=enforce_eager, async_scheduling=async_scheduling, quantization=quantization,
            kv_cache_dtype=kv_cache_dtype, kernel_options=kernel_options,
            speculative_config=speculative_config, enable_lora=enable_lora, max_loras=max_loras,
            max_lora_rank=max_lora_rank, max_cpu_loras=max_cpu_loras,
            pipeline_parallel_size=pipeline_parallel_size, tpot_target_ratio=tpot_target_ratio,
            max_prefill_delay_ms=max_prefill_delay_ms, min_prefill_chunk_tokens=min_prefill_chunk_tokens)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        lora_request: one adapter for every prompt, or a list with one (or None) per prompt."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params has {len(params_list)} entries for {len(prompts)} prompts")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"lora_request has {len(loras)} entries for {len(prompts)} prompts")
        engine = self.llm_engine
        request_ids = [f"llm-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:
            for rid, prompt, params, lora in zip(request_ids, prompts, params_list, loras):
                engine.add_request(rid, prompt, params, lora, final_only=True)
                added.append(rid)
            outputs = self._run(request_ids, use_tqdm)
            refused = [engine.refused.pop(rid) for rid in request_ids if rid in engine.refused]
            if refused:   # (a grammar that does not compile is found by the core)
                raise ValueError(refused[0])
            return outputs
        finally:
            # On a bad prompt (or Ctrl-C) nothing may stay queued or hold KV blocks.
            engine.abort_request([rid for rid in added if rid in engine.output_processor.requests])

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(request_ids), desc="Generating", unit="req", dynamic_ncols=True)
        try:
            while len(done) < len(request_ids):
                for out in engine.step(finished_only=True):
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [done[rid] for rid in request_ids]

    def shutdown(self) -> None:
        self.llm_engine.shutdown()
