"""Replicas scaled through the Ray autoscaler, from zero accelerator nodes and back.

`ray.cluster_utils.AutoscalingCluster` (fake multi-node provider, autoscaler v1) in its own scope
(tests/testkit/ray_clusters.py: own ports and temp dir, stopped by PID): a head with no accelerator and no
CPU, and one node type, `gpu_node`, with 1 CPU and 1 `fake_gpu` (the custom resource stands in for
a GPU on this CPU machine), at most 2 of them, plus `cpu_2x` (2 CPUs, at most 1) for a TP=2 group;
idle timeout 6 s. Each replica's engine actor asks for one `fake_gpu`, so every replica needs a node
of its own that the autoscaler has to start. The replicas' cores sleep before each step
(tests/testkit/slow_core.py), so a request is still generating when the scale-down begins, however fast
the engine is.

The times of each phase are printed (pytest -s) for the record.
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest

from testkit.ray_clusters import ScopedAutoscalingCluster  # sets the loopback variables before Ray loads

import ray  # noqa: E402

from testkit.tiny_models import make_tiny_llama  # noqa: E402

from pagedray.cluster import LLM, SamplingParams  # noqa: E402
from pagedray.cluster.executors.ray_utils import check_fits  # noqa: E402
from pagedray.cluster.serving.autoscaler import Autoscaler, AutoscalingConfig, RayResourceRequest  # noqa: E402
from pagedray.cluster.serving.frontend import Frontend  # noqa: E402
from pagedray.cluster.serving.ray_client import RayClient  # noqa: E402

NODE_TYPES = {"gpu_node": {"resources": {"CPU": 1, "fake_gpu": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
              "cpu_2x": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1}}
ENGINE_KW = dict(device="cpu", block_size=16, num_kv_blocks=256, max_model_len=1024)
LONG = 300          # tokens of a request that outlives the scale-down delay (1 s) at >= 20 ms a step
STEP_DELAY_S = 0.02


def fake_gpu_replica(ckpt: str, name: str) -> RayClient:
    """A replica whose engine actor holds one `fake_gpu`, as a GPU replica holds its GPU."""
    return RayClient(ckpt, dict(ENGINE_KW, step_delay_s=STEP_DELAY_S), name=name,
                     core_factory="testkit.slow_core:slow_engine_core", resources={"fake_gpu": 1})


@pytest.fixture(scope="module")
def cluster():
    c = ScopedAutoscalingCluster({"CPU": 0}, NODE_TYPES, max_workers=3)
    c.start()
    os.environ["PAGEDRAY_AUTOSCALING_CONFIG"] = c.config_file
    try:
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        os.environ.pop("PAGEDRAY_AUTOSCALING_CONFIG", None)
        c.shutdown()
    assert not c.processes(), "processes of the test cluster outlived its shutdown"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("autoscale"), max_position_embeddings=1024)


def _gpu_nodes() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("fake_gpu"))


def test_check_fits_reads_the_node_types(cluster):
    assert _gpu_nodes() == 0
    check_fits(1, "fake_gpu")            # no such node up, but the autoscaler can start one
    check_fits(2, "CPU")                 # cpu_2x holds both ranks
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 .* no node type has 2 fake_gpu "
                                         r"\(gpu_node has 1, cpu_2x has 0\)"):
        check_fits(2, "fake_gpu")
    with pytest.raises(ValueError, match=r"no node type has 3 CPU \(gpu_node has 1, cpu_2x has 2\)"):
        check_fits(3, "CPU")


async def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.1)


class _Opened:
    """A request in flight: its stream stays open (the router counts it) until `_finish` reads it
    out; the tokens of its delta messages add up in `tokens`."""

    def __init__(self, stream, first) -> None:
        self.stream, self.tokens = stream, list(first.outputs[0].token_ids)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _open(frontend: Frontend, prompt: dict, max_tokens: int) -> _Opened:
    stream = frontend.generate(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return _Opened(stream, await stream.__anext__())


async def _finish(opened: _Opened) -> list[int]:
    last = None
    async for out in opened.stream:
        opened.tokens += out.outputs[0].token_ids if out.outputs else []
        last = out
    assert last is not None and last.finished
    return opened.tokens


def test_scale_from_zero_nodes_and_back_without_dropping_requests(cluster, ckpt):
    prompts = {name: {"prompt_token_ids": [3 + i, 40 + 7 * i, 11, 90 + i]}
               for i, name in enumerate(["a", "b", "probe", "x1", "x2", "x3"])}
    lengths = dict(a=LONG, b=LONG, probe=8)
    t_ref = time.monotonic()
    reference = LLM(ckpt, **ENGINE_KW)
    want = {name: reference.generate([prompts[name]], SamplingParams(temperature=0.0, max_tokens=lengths[name],
                                                                      ignore_eos=True),
                                     use_tqdm=False)[0].outputs[0].token_ids for name in lengths}
    reference.shutdown()
    print(f"reference outputs took {time.monotonic() - t_ref:.1f} s")
    config = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=0,
                               downscale_delay_s=1.0, interval_s=0.2)
    times: dict[str, float] = {}

    async def scenario():
        t0 = time.monotonic()
        mark = lambda what: times.setdefault(what, round(time.monotonic() - t0, 1))  # noqa: E731
        frontend = Frontend()
        router = frontend.router
        scaler = Autoscaler(router, lambda name: fake_gpu_replica(ckpt, name), config,
                            resource_request=RayResourceRequest([{"CPU": 1, "fake_gpu": 1}]))
        starting = asyncio.get_running_loop().create_task(scaler.start())
        await asyncio.sleep(1.0)
        assert _gpu_nodes() == 0 and not starting.done()    # the replica waits for a node: not refused
        await _wait_for(lambda: _gpu_nodes() == 1, 90, "the first node")
        mark("first node up")
        await starting
        mark("first replica ready")
        load = [await _open(frontend, prompts[name], LONG) for name in ("x1", "x2", "x3")]
        await _wait_for(lambda: scaler.target == 2, 30, "2 replicas wanted (3 in flight / 2)")
        mark("2 replicas wanted")
        assert scaler.resource_request.replicas == 2         # asked the Ray autoscaler ahead
        await _wait_for(lambda: _gpu_nodes() == 2, 90, "the second node")
        mark("second node up")
        await _wait_for(lambda: router.num_ready == 2, 120, "the second replica")
        mark("second replica ready")
        second = router.replicas[1]
        got = {"probe": await _finish(await _open(frontend, prompts["probe"], lengths["probe"]))}
        assert router.routed[second.name] == 1               # the new replica serves
        for stream in load:
            await stream.aclose()                            # the load goes (aborted) ...
        streams = {name: await _open(frontend, prompts[name], LONG) for name in ("a", "b")}
        assert [router.num_inflight_on(r) for r in router.replicas] == [1, 1]   # ... one long request runs on each
        await _wait_for(lambda: router.draining, 60, "a replica to drain (2 in flight / 2 -> 1)")
        mark("scale-down: draining")
        drained = next(r for r in router.replicas if r.name in router.draining)
        assert router.num_inflight_on(drained) == 1                      # its request is still generating
        await asyncio.sleep(1.0)
        assert drained.name in router.draining               # and the drain waits for it
        got.update({name: await _finish(stream) for name, stream in streams.items()})
        mark("all requests finished")
        await _wait_for(lambda: router.num_ready == 1 and not scaler.draining, 60, "the drained replica removed")
        mark("drained replica removed")
        assert scaler.resource_request.replicas == 0
        await _wait_for(lambda: _gpu_nodes() == 1, 90, "its node to go away")
        mark("its node removed")
        await scaler.stop()
        await frontend.shutdown()
        await _wait_for(lambda: _gpu_nodes() == 0, 90, "the last node to go away")
        mark("last node removed after shutdown")
        return got

    got = asyncio.run(scenario())
    print("autoscaling timeline (s):", times)
    assert got == want      # every request complete, none dropped by the scale-down


def test_tp_group_waits_for_a_node_type_that_holds_it(cluster, ckpt):
    """A TP=2 placement group (2 x {"CPU": 1}, STRICT_PACK) fits no node alive, only the cpu_2x type:
    the executor waits for the autoscaler to start one instead of refusing, then serves."""
    def cpu_2x_nodes() -> int:
        return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU") == 2)
    assert cpu_2x_nodes() == 0
    prompts = [{"prompt_token_ids": [5, 9, 14, 33]}, {"prompt_token_ids": list(range(40, 61))}]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    want = [o.outputs[0].token_ids for o in LLM(ckpt, **ENGINE_KW).generate(prompts, params, use_tqdm=False)]
    t0 = time.monotonic()
    llm = LLM(ckpt, **ENGINE_KW, executor="ray", tensor_parallel_size=2)
    try:
        print(f"TP=2 group placed on a new node after {time.monotonic() - t0:.1f} s")
        assert cpu_2x_nodes() == 1
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    finally:
        llm.shutdown()
    deadline = time.monotonic() + 90
    while cpu_2x_nodes():
        assert time.monotonic() < deadline, "the cpu_2x node outlived its idle timeout"
        time.sleep(0.5)
