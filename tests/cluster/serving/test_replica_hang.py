"""Two replicas behind the frontend and the gRPC server, on CPU with a tiny random Llama: engine
cores in subprocesses (ProcessClient, the local backend) or in Ray actors (RayClient). A replica
that hangs (SIGSTOP) mid-stream is found within the liveness bound, its streams finish on the other
one with the tokens of an undisturbed run, it gets no traffic once found, and it is replaced. A replica killed: requests sent right after all
succeed, and streams cancelled while they move leave no KV block held anywhere.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from testkit.client_checks import wait_gone
from testkit.grpc_cases import make_request as _request
from testkit.migration_cases import (SERVING, finish_streams, open_streams, serving, slow_clients, undisturbed,
                             wait_until, watch_health, whole_streams)
from testkit.ray_clusters import start_local_ray

BOUND = 3.0          # liveness bound of these clients (the default is 10 s)


@pytest.fixture(scope="module")
def ray_local():
    import ray
    start_local_ray(num_cpus=4)
    yield
    ray.shutdown()


@pytest.fixture(params=["local", "ray"])
def backend(request) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_local")
    return request.param


def test_hung_replica_is_found_within_the_bound_and_its_streams_finish_elsewhere(tiny_llama, backend):
    want = undisturbed(tiny_llama)

    async def scenario():
        async with serving(tiny_llama, backend, 2, **slow_clients(BOUND)) as s, \
                watch_health(s.channel, every_s=0.05) as statuses:
            router, stub = s.router, s.stub
            calls = open_streams(stub)
            firsts = [await call.read() for call in calls]          # all 26 mid-stream
            victim = router.replicas[0]
            doomed = router.num_inflight_on(victim)
            os.kill(victim.pid, signal.SIGSTOP)
            found_after = await wait_until(lambda: victim.dead_error is not None, 4 * BOUND, "the hang to be found")
            routed_then = router.routed[victim.name]
            after = await asyncio.gather(*[stub.Generate(_request([9, 4 + i], max_tokens=3, ignore_eos=True))
                                           for i in range(6)])
            rests = await finish_streams(calls)
            await wait_until(lambda: router.num_ready == 2, 120, "the replacement replica")
            return (victim, doomed, found_after, routed_then - router.routed[victim.name], after, firsts, rests,
                    statuses, [c.name for c in router.replicas])   # statuses: complete once the block exits

    victim, doomed, found_after, new_on_victim, after, firsts, rests, statuses, names = asyncio.run(scenario())
    assert doomed > 0
    assert found_after < 4 * BOUND and "sent nothing" in str(victim.dead_error)
    assert new_on_victim == 0, "the hung replica got traffic after it was found"
    assert all(len(a.completions[0].token_ids) == 3 for a in after)
    assert whole_streams(firsts, rests) == want
    assert statuses and set(statuses) == {SERVING}
    assert victim.name not in names and len(names) == 2
    assert wait_gone(victim.pid, 20), "the hung core process was killed, not left stopped"


def test_requests_right_after_a_death_succeed_and_cancels_during_the_move_free_every_block(tiny_llama, backend):
    async def scenario():
        async with serving(tiny_llama, backend, 2, **slow_clients(BOUND)) as s:
            frontend, router, stub = s.frontend, s.router, s.stub
            # 240 tokens at >= 50 ms a step: 12 s to finish by themselves, well past the 5 s below.
            calls = [stub.GenerateStream(_request([7, 8, 9 + i], f"c{i}", max_tokens=240, ignore_eos=True))
                     for i in range(8)]
            for call in calls:
                await call.read()
            victim = router.replicas[0]
            assert router.num_inflight_on(victim) > 0
            os.kill(victim.pid, signal.SIGKILL)
            # Sent right after the death, before the frontend may even know of it: all must succeed.
            quick = [asyncio.ensure_future(stub.Generate(_request([9, 3 + i], max_tokens=3, ignore_eos=True)))
                     for i in range(6)]
            await asyncio.sleep(0.01)            # the death is being handled: streams are moving
            for call in calls:
                call.cancel()
            await wait_until(lambda: victim.dead_error is not None and victim not in router.replicas,
                         4 * BOUND, "the death to be handled")
            survivor = router.replicas[0]

            async def used(clients) -> list[int]:
                return [(await c.get_stats()).num_used_blocks for c in clients]

            # Within 5 s of the kill, long before the streams could end by themselves.
            deadline = time.monotonic() + 5
            held = await used([survivor])
            while any(held) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                held = await used([survivor])
            quick = await asyncio.gather(*quick)
            await wait_until(lambda: router.num_ready == 2, 120, "the replacement replica")
            return (held + await used([c for c in router.replicas if c is not survivor]), frontend.num_pending,
                    quick)

    held, pending, quick = asyncio.run(scenario())
    assert held == [0, 0], f"blocks still held per replica: {held}"
    assert pending == 0
    assert all(len(q.completions[0].token_ids) == 3 for q in quick)
