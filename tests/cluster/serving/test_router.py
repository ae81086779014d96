"""The Router over fake clients: least outstanding load, rotation, prefix affinity by the shared
block hash, dead and draining clients skipped, drain then shutdown."""
from __future__ import annotations

import asyncio

import pytest

from testkit.router_fakes import BLOCK, FakeReplica, Held, tokens

from pagedray.cluster.core.block_hash import block_hashes
from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.router import Router


def _routed(n: int, **router_kw) -> tuple[list[FakeReplica], Router, Held]:
    """Fake replicas r0..r{n-1}, a Router over them, and a Held that routes requests through it."""
    replicas = [FakeReplica(f"r{i}") for i in range(n)]
    router = Router(replicas, **router_kw)
    return replicas, router, Held(router)


def test_least_loaded_with_rotation_among_equals():
    async def scenario():
        _, router, held = _routed(3)
        # Idle replicas take turns (no prefix: 2-token prompts).
        firsts = [(await held.start(f"a{i}", tokens([i, i], []))).name for i in range(3)]
        assert sorted(firsts) == ["r0", "r1", "r2"]
        # r0 and r1 busy with one more each: the next goes to the one with less.
        await held.finish(f"a{firsts.index('r2')}")
        assert (await held.start("b", tokens([5, 5], []))).name == "r2"
        # A heavier request (weight 4) makes its replica the busiest.
        heavy = await held.start("heavy", tokens([6, 6], []), n=4)
        assert router.load[heavy.name] >= 4
        assert (await held.start("c", tokens([7, 7], []))) is not heavy
        router.progress("heavy", 3)                      # tokens produced lower the load
        assert router.load[heavy.name] == 2
        await held.finish_all()
        assert router.num_pending == 0 and set(router.load.values()) == {0}

    asyncio.run(scenario())


def test_prefix_affinity_within_slack():
    async def scenario():
        _, router, held = _routed(2, affinity_slack=2)
        shared = list(range(10, 18))                     # two full blocks
        home = await held.start("p0", tokens(shared, [1]))
        # Same prefix: same replica while its load is within 2 of the least loaded (loads 1-0, 2-0).
        assert (await held.start("p1", tokens(shared, [2, 3]))) is home
        assert (await held.start("p2", tokens(shared, [4]))) is home
        # Load 3 vs 0 is beyond the slack: the least loaded takes it (and becomes the prefix's home).
        other = await held.start("p3", tokens(shared, [5]))
        assert other is not home
        # A different prefix that shares only the first block follows that block's latest home.
        assert (await held.start("q", tokens(shared[:4] + [77, 78, 79, 80], []))) is other
        # No full block: no affinity, least loaded.
        loads = dict(router.load)
        short = await held.start("s", tokens([1, 2], []))
        assert loads[short.name] == min(loads.values())
        await held.finish_all()

    asyncio.run(scenario())


def test_deepest_shared_prefix_wins():
    async def scenario():
        replicas, router, held = _routed(2, affinity_slack=8)
        a, b = list(range(20, 24)), list(range(30, 34))
        first = await held.start("x", tokens(a + b, []))
        await held.finish("x")
        assert (await held.start("y", tokens(a + [1, 1, 1, 1], []))) is first   # shares one block
        router._affinity[block_hashes(a, BLOCK, 8)[0]] = next(r for r in replicas if r is not first).name
        await held.finish("y")
        # The 1-block entry now points elsewhere, but the 2-block entry still names `first`.
        assert (await held.start("z", tokens(a + b + [5], []))) is first
        await held.finish("z")

    asyncio.run(scenario())


def test_dead_and_dropped_clients_are_never_chosen():
    async def scenario():
        replicas, router, held = _routed(2)
        changes = []
        router.on_change(lambda: changes.append(router.num_ready))
        replicas[0].error = EngineDeadError("gone")      # dead, not yet dropped: already skipped
        for i in range(3):
            assert (await held.start(f"a{i}", tokens([i, i], []))).name == "r1"
        router.drop(replicas[0])
        assert changes == [1] and router.is_healthy and [r.name for r in router.replicas] == ["r1"]
        replicas[1].error = EngineDeadError("gone too")
        assert not router.is_healthy
        with pytest.raises(EngineDeadError, match="no healthy replica"):
            router.choose([1, 2])
        await held.finish_all()

    asyncio.run(scenario())


def test_remove_replica_drains_then_shuts_down():
    async def scenario():
        replicas, router, held = _routed(2)
        victim = await held.start("a", tokens([1, 2, 3, 4], []))
        removal = asyncio.get_running_loop().create_task(router.remove_replica(victim))
        await asyncio.sleep(0.1)
        assert not victim.shut and router.num_ready == 1
        # While draining, new requests (even with the victim's prefix) go elsewhere.
        assert (await held.start("b", tokens([1, 2, 3, 4], []))) is not victim
        await held.finish("a")
        await removal
        assert victim.shut and [r.name for r in router.replicas] == [r.name for r in replicas if r is not victim]
        await held.finish("b")

    asyncio.run(scenario())
