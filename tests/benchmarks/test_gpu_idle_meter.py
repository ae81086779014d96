"""benchmarks/stage_timer.GpuIdleMeter, the GPU-idle figure of throughput.py: "n/a" on a CPU, and on
a GPU a busy time between the profiler's kernel time (it bounds it from above: launch gaps inside a
step count as busy) and the run's wall time."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from stage_timer import GpuIdleMeter, format_gpu_idle  # noqa: E402

from pagedray.cluster import LLM, SamplingParams  # noqa: E402

PROMPTS = [{"prompt_token_ids": [5 + i, 17, 42, 9 + i]} for i in range(6)]
PARAMS = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12)


def test_cpu_run_reports_na_and_leaves_the_runner_as_it_was(tiny_llama):
    llm = LLM(tiny_llama, device="cpu", num_kv_blocks=64, max_model_len=64)
    runner = llm.llm_engine.executor.worker.runner
    meter = GpuIdleMeter(llm)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    meter.restore()
    assert [len(o.outputs[0].token_ids) for o in outs] == [12] * len(PROMPTS)
    assert meter.summary(1.0) == {"gpu_idle": "n/a"}
    assert "n/a" in format_gpu_idle(meter.summary(1.0))
    assert "_forward" not in vars(runner) and "execute_model_async" not in vars(runner)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_busy_time_lies_between_kernel_time_and_wall_time(tiny_llama):
    from torch.profiler import ProfilerActivity, profile
    llm = LLM(tiny_llama, device="cuda", num_kv_blocks=64, max_model_len=64)
    llm.generate(PROMPTS, PARAMS, use_tqdm=False)   # warm-up: graphs, kernels
    meter = GpuIdleMeter(llm)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    meter.restore()
    stats = meter.summary(wall)
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    union, end = 0.0, float("-inf")   # µs of the union of kernel and copy intervals
    for s, e in kernels:
        union += max(0.0, e - max(s, end))
        end = max(end, e)
    assert stats["decode_steps"] >= 10
    assert 0.0 <= stats["gpu_idle"] < 1.0
    # (the input copies queued just before each forward are kernel time outside the busy intervals)
    assert union / 1e6 * 0.5 <= stats["gpu_busy_s"] <= wall
    llm.shutdown()
