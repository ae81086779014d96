"""The scaling policy with fake loads and a fake clock, and the Autoscaler loop over fake replicas
(no Ray; through the Ray autoscaler: test_ray_autoscaling.py)."""
from __future__ import annotations

import asyncio

import pytest

from testkit.router_fakes import FakeReplica, Held, tokens

from pagedray.cluster.serving.autoscaler import Autoscaler, AutoscalingConfig, ScalingPolicy
from pagedray.cluster.serving.router import Router


def _policy(**kw) -> ScalingPolicy:
    base = dict(min_replicas=1, max_replicas=4, target_ongoing_requests=10, upscale_delay_s=5,
                downscale_delay_s=30)
    return ScalingPolicy(AutoscalingConfig(**{**base, **kw}))


def test_desired_is_ceil_of_load_over_target_clamped():
    policy = _policy()
    assert [policy.desired(n) for n in (0, 1, 10, 11, 25, 40, 41, 1000)] == [1, 1, 1, 2, 3, 4, 4, 4]
    assert _policy(min_replicas=2).desired(0) == 2


def test_upscale_waits_for_the_delay_of_continuous_demand():
    policy = _policy()
    assert policy.decide(0.0, current=1, ongoing=25) == 1
    assert policy.decide(4.9, current=1, ongoing=25) == 1
    assert policy.decide(5.0, current=1, ongoing=25) == 3      # jumps to the desired count at once
    # A dip in the middle restarts the clock.
    policy = _policy()
    policy.decide(0.0, 1, 25)
    policy.decide(3.0, 1, 5)
    assert policy.decide(7.0, 1, 25) == 1
    assert policy.decide(12.0, 1, 25) == 3


def test_downscale_waits_longer_and_a_burst_resets_it():
    policy = _policy()
    assert policy.decide(0.0, current=3, ongoing=0) == 3
    assert policy.decide(20.0, current=3, ongoing=25) == 3     # wanted 3 again: the down clock stops
    assert policy.decide(21.0, current=3, ongoing=0) == 3
    assert policy.decide(50.9, current=3, ongoing=0) == 3
    assert policy.decide(51.0, current=3, ongoing=0) == 1


def test_below_min_or_above_max_is_fixed_at_once():
    policy = _policy(min_replicas=2)
    assert policy.decide(0.0, current=1, ongoing=0) == 2       # a replica died: replace it now
    assert policy.decide(0.0, current=6, ongoing=100) == 4


@pytest.mark.parametrize("kw,field", [(dict(min_replicas=0), "min_replicas"),
                                      (dict(min_replicas=3, max_replicas=2), "max_replicas"),
                                      (dict(initial_replicas=5), "replicas"),
                                      (dict(target_ongoing_requests=0), "target_ongoing_requests"),
                                      (dict(upscale_delay_s=-1), "upscale_delay_s")])
def test_bad_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        AutoscalingConfig(**{"max_replicas": 4, **kw})


class SlowFake(FakeReplica):
    """Starts when `ready` is set, as a Ray replica waits for its node."""

    def __init__(self, name: str, ready: asyncio.Event) -> None:
        super().__init__(name)
        self.ready = ready

    async def start(self):
        await self.ready.wait()


def test_autoscaler_adds_in_background_drains_and_replaces_dead():
    async def scenario():
        clock = [0.0]
        ready = asyncio.Event()
        ready.set()
        made: list[SlowFake] = []

        def make(name):
            made.append(SlowFake(name, ready))
            return made[-1]

        asked: list[int] = []      # what the cluster's autoscaler was asked to make room for

        class Recorder:
            def set(self, replicas: int) -> None:
                asked.append(replicas)

        router = Router()
        config = AutoscalingConfig(min_replicas=1, max_replicas=3, target_ongoing_requests=2,
                                   upscale_delay_s=1, downscale_delay_s=10)
        scaler = Autoscaler(router, make, config, clock=lambda: clock[0], resource_request=Recorder())
        await scaler.start()
        assert router.num_ready == 1
        held = Held(router)
        for i in range(5):
            await held.start(f"r{i}", tokens([i, i], []))
        ready.clear()                       # new replicas now wait for their "node"
        scaler.step()
        clock[0] = 1.0
        scaler.step()                       # 5 ongoing / 2 -> 3 replicas, two of them starting
        assert len(scaler.starting) == 2 and router.num_ready == 1
        assert asked == [3]                 # asked ahead, while the two are still starting
        assert (await held.start("r5", tokens([9, 9], []))).name == "replica-0"  # serving goes on
        ready.set()
        await asyncio.sleep(0.01)
        assert router.num_ready == 3 and not scaler.starting
        # A dead replica is removed and, below the minimum... here still above it: just removed.
        made[1].error = RuntimeError("gone")
        scaler.step()
        await asyncio.sleep(0.01)
        assert [r.name for r in router.replicas] == ["replica-0", "replica-2"]
        # Idle for the down delay: drain down to the minimum, the least loaded first.
        await held.finish_all()
        clock[0] = 2.0
        scaler.step()
        clock[0] = 12.0
        scaler.step()
        await asyncio.sleep(0.01)
        assert router.num_ready == 1 and sum(r.shut for r in made) == 2
        assert asked == [3, 0]              # scaling down withdrew the request
        # The last one dies: below the minimum, a new one starts at once.
        router.replicas[0].error = RuntimeError("gone")
        scaler.step()
        await asyncio.sleep(0.01)
        assert router.num_ready == 1 and router.replicas[0].name == "replica-3"
        assert asked == [3, 0, 1]
        await scaler.stop()
        assert asked == [3, 0, 1, 0]
        await router.shutdown()
        return made

    made = asyncio.run(scenario())
    assert all(r.shut for r in made)


def test_start_raises_when_no_replica_can_start():
    class Broken(FakeReplica):
        async def start(self):
            raise ValueError("model architectures ['X'] are not supported")

    async def scenario():
        scaler = Autoscaler(Router(), Broken, AutoscalingConfig(min_replicas=2, max_replicas=2))
        with pytest.raises(ValueError, match="not supported"):
            await scaler.start()

    asyncio.run(scenario())
