"""KernelOptions travel in the engine config: set on the driver, they are what the kernels read in
an engine core's own process and in a Ray worker (module globals reached neither)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

from pagedray.cluster import LLM  # noqa: E402
from pagedray.common.config import KernelOptions  # noqa: E402
from pagedray.kernels import options  # noqa: E402

# Every field away from its default, so a worker that kept the defaults cannot pass.
CHANGED = KernelOptions(prefill_backend="reference", split_mixed_steps=False, skinny_gemm=False,
                        skinny_gemm_max_m=4, fp8_skinny_gemm_max_m=2, fused_rotary_cache=False, fused_sampling=False,
                        attention_variant={"NUM_WARPS": 8, "PREFETCH": 0}, prefill_variant={"BLOCK_N": 128},
                        gc_threshold=1000, lora_dense_min_tokens=64, lora_narrow_kernels_min_tokens=256,
                        lora_narrow_kernels_max_tokens=512)


def test_every_field_differs_from_the_default():
    default = dataclasses.asdict(KernelOptions())
    assert all(default[k] != v for k, v in dataclasses.asdict(CHANGED).items())


def test_options_reach_a_core_in_its_own_process(tiny_llama, tmp_path):
    from pagedray.cluster.serving.process_client import ProcessClient
    report = tmp_path / "options.json"
    kwargs = {"device": "cpu", "num_kv_blocks": 32, "report_to": str(report),
              "kernel_options": CHANGED}   # encoded in the start-up message as a map
    client = ProcessClient(tiny_llama, kwargs, core_factory="testkit.core_fakes:options_reporting_core",
                           startup_timeout_s=300, num_threads=1)

    async def main():
        await client.start()
        await client.shutdown()
    asyncio.run(main())
    assert json.loads(report.read_text()) == dataclasses.asdict(CHANGED)
    assert options.current() == KernelOptions()     # this process's own are untouched


def test_options_reach_a_ray_worker(tiny_llama):
    import ray
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        llm = LLM(tiny_llama, device="cpu", executor="ray", num_kv_blocks=32, kernel_options=CHANGED)
        try:
            worker = llm.llm_engine.executor.workers[0]
            assert ray.get(worker.__ray_call__.remote(lambda actor: options.current())) == CHANGED
        finally:
            llm.llm_engine.shutdown()
    finally:
        ray.shutdown()


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="prefill_backend must be one of"):
        KernelOptions(prefill_backend="flash")
    with pytest.raises(ValueError, match=r"skinny_gemm_max_m must be in \[1, 8\], got 9"):
        KernelOptions.parse(["skinny_gemm_max_m=9"])
    with pytest.raises(ValueError, match=r"attention_variant keys must be among .*'WARPS'"):
        KernelOptions(attention_variant={"WARPS": 2})
    with pytest.raises(ValueError, match=r"kernel_options has unknown field\(s\) \['fused'\]"):
        KernelOptions.of({"fused": True})
    with pytest.raises(ValueError, match=r"prefill_variant keys must be among .*'TILE'"):
        KernelOptions(prefill_variant={"TILE": 2})
    assert KernelOptions.parse(["split_mixed_steps=0", "attention_variant.NUM_WARPS=8"]) == KernelOptions(
        split_mixed_steps=False, attention_variant={"NUM_WARPS": 8})
    assert KernelOptions.parse(["prefill_backend=triton_flash", "prefill_variant.BLOCK_N=128"]) == KernelOptions(
        prefill_backend="triton_flash", prefill_variant={"BLOCK_N": 128})
