"""ProcessClient and RayClient in front of the real EngineCore (tiny random Llama, CPU): the same
requests give exactly the outputs of the core stepped in this process (greedy, seeded sampling,
n=2, logprobs, a refused request)."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

from testkit.client_checks import assert_same_outputs, run_client, run_core, time_to_death  # noqa: E402
from testkit.tiny_models import make_tiny_llama  # noqa: E402

from pagedray.cluster.core.engine_core import EngineCore  # noqa: E402
from pagedray.cluster.core.messages import CoreRequest  # noqa: E402
from pagedray.cluster.serving.process_client import ProcessClient  # noqa: E402
from pagedray.common.sampling_params import SamplingParams  # noqa: E402

ENGINE_KW = dict(device="cpu", block_size=4, num_kv_blocks=256, max_model_len=128)


def batch() -> list[CoreRequest]:
    """Fresh each time: the core fills in defaults on the params it is given."""
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    reqs = [CoreRequest(f"g{i}", [5 + i, 17, 9 + 3 * i, 40], greedy.clone()) for i in range(6)]
    reqs += [
        CoreRequest("seeded", [3, 4, 5], SamplingParams(temperature=0.9, seed=7, max_tokens=10, ignore_eos=True)),
        CoreRequest("n2", [8, 9], SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)),
        CoreRequest("lp", [11, 12, 13], SamplingParams(temperature=0, max_tokens=5, logprobs=2, ignore_eos=True)),
        CoreRequest("bad", [10_000], SamplingParams(max_tokens=3)),
    ]
    return reqs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("clients_core"))


@pytest.fixture(scope="module")
def reference(ckpt) -> dict:
    core = EngineCore.from_kwargs(ckpt, **ENGINE_KW)
    try:
        want = run_core(core, batch())
    finally:
        core.shutdown()
    assert want[("bad", 0)]["error"] and len(want[("n2", 1)]["tokens"]) == 6
    return want


async def _through(client) -> dict:
    await client.start()
    try:
        assert client.info.vocab_size == 320
        return await run_client(client, batch())
    finally:
        await client.shutdown()


def test_process_client_gives_the_in_process_outputs(ckpt, reference):
    got = asyncio.run(_through(ProcessClient(ckpt, ENGINE_KW, name="p")))
    assert_same_outputs(got, reference)


def test_ray_client_gives_the_in_process_outputs(ckpt, reference):
    import ray
    import torch

    from pagedray.cluster.serving.ray_client import RayClient
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        client = RayClient(ckpt, ENGINE_KW, name="r", num_threads=torch.get_num_threads())
        got = asyncio.new_event_loop().run_until_complete(_through(client))
    finally:
        ray.shutdown()
    assert_same_outputs(got, reference)


def test_ray_client_tp_group_is_freed_when_the_actor_is_killed(ckpt):
    """executor="ray": the core's TP ranks sit in a placement group that outlives a killed core
    actor unless the client removes it."""
    import ray
    from ray.util.placement_group import placement_group_table

    from pagedray.cluster.serving.ray_client import RayClient
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    loop = asyncio.new_event_loop()
    try:
        client = RayClient(ckpt, {**ENGINE_KW, "executor": "ray", "tensor_parallel_size": 2}, name="tp",
                           liveness_s=30)

        async def body():
            await client.start()
            assert client.placement_group is not None
            pgs.append(client.placement_group)
            await client.add(batch()[:2])
            os.kill(client.pid, signal.SIGKILL)
            _, error = await time_to_death(client, 15)
            assert "actor died" in str(error)
            await client.shutdown()
        pgs: list = []
        loop.run_until_complete(body())
        deadline = time.monotonic() + 30
        while ray.available_resources().get("CPU") != 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert placement_group_table(pgs[0])["state"] == "REMOVED"
        assert ray.available_resources().get("CPU") == 3, ray.available_resources()
    finally:
        loop.close()
        ray.shutdown()
