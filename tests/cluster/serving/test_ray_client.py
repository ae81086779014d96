"""RayClient: an engine core in a Ray actor (local Ray of our own, 127.0.0.1), fake core.

One event loop serves the module (Ray's asyncio futures bind to it).
"""
from __future__ import annotations

import asyncio
import os

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import ray  # noqa: E402

from testkit.client_checks import FAKE_CORE as FAKE  # noqa: E402
from testkit.client_checks import (assert_closed, cancel_mid_start, check_kill_is_found, check_stop_is_found,  # noqa: E402
                                   collect, expected, requests)
from testkit.ray_clusters import start_local_ray, wait_cpus_free  # noqa: E402

from pagedray.cluster.core.messages import CoreRequest  # noqa: E402
from pagedray.cluster.serving.ray_client import RayClient  # noqa: E402
from pagedray.common.sampling_params import SamplingParams  # noqa: E402

BOUND = 3.0
NUM_CPUS = 4


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    start_local_ray(NUM_CPUS)   # the fake core lives in tests/, on the workers' PYTHONPATH
    yield
    try:
        _assert_released()
    finally:
        ray.shutdown()


def _assert_released() -> None:
    wait_cpus_free(NUM_CPUS)


def _run(loop, body, liveness_s: float = BOUND, **kwargs):
    async def main():
        client = RayClient("fake-model", {"device": "cpu", **kwargs}, name="t", core_factory=FAKE,
                           liveness_s=liveness_s, startup_timeout_s=120)
        await client.start()
        try:
            return await body(client)
        finally:
            await client.shutdown()
    return loop.run_until_complete(main())


def test_tokens_abort_bad_input_and_heartbeat(loop):
    async def body(client):
        batch = requests(16, 10)
        await client.add(batch)
        bad = CoreRequest("bad", [], SamplingParams(max_tokens=2))
        await client.add([bad, CoreRequest("long", [1, 2], SamplingParams(max_tokens=100_000))])
        await client.abort(["long"])
        got = await collect(client, {r.request_id for r in batch} | {"bad"})
        assert got.pop("bad")[0] == "error"
        assert got == {r.request_id: expected(r) for r in batch}
        await asyncio.sleep(2 * BOUND)     # idle beyond the bound: heartbeats keep it alive
        assert client.dead_error is None
        assert (await client.get_stats()).num_running == 0
    _run(loop, body)


def test_sigstopped_actor_is_detected_within_the_bound(loop):
    async def body(client):
        await check_stop_is_found(client, 100_000, within_s=4 * BOUND, gone_s=20)
    _run(loop, body, step_delay_s=0.01)
    _assert_released()


def test_killed_actor_is_detected_at_once(loop):
    async def body(client):
        # Well inside the 30 s liveness bound: the pending watch() call fails as soon as Ray
        # sees the death (the liveness path would say "sent nothing" instead).
        await check_kill_is_found(client, 100_000, within_s=15, cause="actor died")
    _run(loop, body, liveness_s=30, step_delay_s=0.01)
    _assert_released()


def test_start_up_errors(loop):
    async def main():
        client = RayClient("fake-model", {"device": "cpu", "vocab_size": 0}, core_factory=FAKE,
                           liveness_s=BOUND, startup_timeout_s=120)
        with pytest.raises(ValueError, match="vocab_size must be >= 1, got 0"):
            await client.start()
        assert_closed(client)
        client = RayClient("fake-model", {"device": "cpu"}, core_factory=FAKE, liveness_s=BOUND,
                           startup_timeout_s=120)
        await cancel_mid_start(client)    # the actor is killed, the wire closed
        assert_closed(client)
    loop.run_until_complete(main())
    _assert_released()
