"""Pipeline parallelism through the engine on the Ray executor (CPU, gloo): Llama at PP=2 and Mixtral
(MoE) at TP=2 x PP=2 against HF transformers; steps in flight; a killed stage; bad sizes.

The checkpoints (testkit/ray_engine_cases.py) have 2 layers each: one per stage. One local Ray instance
(4 CPUs) serves the whole module.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

# Before Ray: this module sets the variables Ray reads at import (traffic on 127.0.0.1).
from testkit.ray_engine_cases import (ENGINE_KW, GREEDY, checkpoints, generate, random_prompts,  # noqa: F401
                                      ray_local)

import ray

from testkit.hf_compare import assert_greedy_match
from testkit.hf_reference import hf_greedy
from testkit.tiny_models import load_hf_model

from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.engine import EngineDeadError


def _watch_in_flight(executor) -> dict:
    """Wrap the executor's submit: record the most steps in flight at once, and fail if a request is
    in two of them."""
    seen = {"peak": 0, "overlap": []}
    in_flight: list[set[str]] = []
    submit = executor.execute_model_async

    def watched(sched):
        ids = set(sched.num_scheduled_tokens)
        seen["overlap"] += [ids & other for other in in_flight if ids & other]
        step = submit(sched)
        in_flight.append(ids)
        seen["peak"] = max(seen["peak"], len(in_flight))
        get = step.get

        def done():
            out = get()
            if ids in in_flight:
                in_flight.remove(ids)
            return out
        step.get = done
        return step
    executor.execute_model_async = watched
    return seen


def _kv_shapes(executor) -> list[tuple]:
    return ray.get([w.__ray_call__.remote(lambda self: [tuple(c.shape) for c in self.worker.cache.kv_caches])
                    for w in executor.workers])


def _assert_matches_hf(path: str, prompts: list[list[int]], got, what: str) -> None:
    hf = load_hf_model(path)
    for i, (ours, p) in enumerate(zip(got, prompts)):
        assert_greedy_match(ours, hf_greedy(hf, p, GREEDY.max_tokens), what=f"{what} prompt {i} vs HF")


def test_pp2_matches_hf_then_a_killed_stage_fails_fast(checkpoints):
    """Llama at PP=2: two steps in flight, none sharing a request, each stage holding its one layer's
    KV cache; greedy output equals HF's. Then stage 1 is killed: the engine fails within seconds."""
    path = checkpoints["llama"]
    prompts = random_prompts(6, seed=4)
    llm = LLM(path, executor="ray", pipeline_parallel_size=2, **ENGINE_KW)
    try:
        executor = llm.llm_engine.executor
        assert executor.transport == "calls" and executor.output_rank == 1
        seen = _watch_in_flight(executor)
        got = generate(llm, prompts)
        assert seen["peak"] == 2, "the engine never kept two steps in flight"
        assert not seen["overlap"], f"requests in two in-flight steps: {seen['overlap']}"
        assert llm.llm_engine.get_stats().num_preemptions > 0
        # Structured outputs: the sampling rank (the last stage) masks by the grammar.
        coded = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(
            max_tokens=12, temperature=1.0, seed=1, structured_outputs={"regex": "[0-9]{3}-[a-z]{2}"}), use_tqdm=False)
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", coded[0].outputs[0].text), coded[0].outputs[0].text
        # Each stage holds the KV cache of its one layer (24 blocks, both KV heads).
        assert _kv_shapes(executor) == [[(2, 24, 2, 4, 16)]] * 2
        # Stage 1 gone: stage 0 cannot hand it the next step.
        os.kill(ray.get(executor.workers[1].ping.remote()), signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"rank\(s\) \[1\] of 2 died"):
            generate(llm, random_prompts(3, seed=5))
        assert time.monotonic() - start < 10
    finally:
        llm.shutdown()
    _assert_matches_hf(path, prompts, got, "llama PP=2")


def test_tp2_pp2_moe_matches_hf(checkpoints):
    """Mixtral at TP=2 x PP=2 (4 ranks): the experts split over each stage's 2 ranks."""
    path = checkpoints["mixtral"]
    prompts = random_prompts(4, seed=11)
    llm = LLM(path, executor="ray", tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE_KW)
    try:
        executor = llm.llm_engine.executor
        assert executor.output_rank == 2   # rank = stage * tp + tp_rank: stage 1, tp rank 0
        got = generate(llm, prompts)
        # One layer per stage, one KV head per TP rank.
        assert _kv_shapes(executor) == [[(2, 24, 1, 4, 16)]] * 4
    finally:
        llm.shutdown()
    _assert_matches_hf(path, prompts, got, "mixtral TP=2 x PP=2")


def test_bad_pipeline_sizes_are_value_errors(checkpoints):
    path = checkpoints["llama"]
    with pytest.raises(ValueError, match=r"pipeline_parallel_size \(3\) is larger than the model's "
                                         r"num_hidden_layers \(2\)"):
        LLM(path, executor="ray", pipeline_parallel_size=3, **ENGINE_KW)
    with pytest.raises(ValueError, match="executor='local' runs one process"):
        LLM(path, pipeline_parallel_size=2, **ENGINE_KW)
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 cannot be combined with enable_lora"):
        LLM(path, executor="ray", pipeline_parallel_size=2, enable_lora=True, **ENGINE_KW)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be >= 1"):
        LLM(path, executor="ray", pipeline_parallel_size=0, **ENGINE_KW)
