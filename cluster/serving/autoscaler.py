"""Replica autoscaling on the driver.

`ScalingPolicy` is the decision, pure and clocked from outside: the desired count is
ceil(ongoing requests / target_ongoing_requests), clamped to [min_replicas,
max_replicas]; a change happens only after it has been wanted continuously for the
up- or down-scale delay (hysteresis: a burst does not start replicas, a lull does not
stop them). Below the minimum (a replica died) it restores at once.

`Autoscaler` applies it every `interval_s`: it creates replicas in the background
(a Ray replica asks Ray for its resources; on an autoscaling cluster that is what makes
the Ray autoscaler add a node, which can take minutes) and hands each to the Router once
ready, so serving never waits on a pending placement; it scales down by draining the
least loaded replica, and replaces replicas that died.

With a `ResourceRequest` (Ray: `RayResourceRequest`) it also tells the cluster's autoscaler ahead
of need: on scale-up, room for `target` replicas at once, so nodes start booting while the new
replicas' own placement is still being requested; on scale-down (and stop) the request is withdrawn,
so nothing holds an emptied node past the autoscaler's idle timeout.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from pagedray.cluster.serving.engine_client import EngineClient as Replica
from pagedray.cluster.serving.router import Router

logger = logging.getLogger(__name__)

__all__ = ["AutoscalingConfig", "ScalingPolicy", "Autoscaler", "ResourceRequest", "RayResourceRequest"]


@dataclass
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None   # None: min_replicas
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 300.0
    interval_s: float = 1.0
    retry_delay_s: float = 30.0       # after a replica failed to start
    drain_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.min_replicas < 1:
            raise ValueError(f"min_replicas must be >= 1, got {self.min_replicas}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})")
        if self.initial_replicas is None:
            self.initial_replicas = self.min_replicas
        if not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"replicas ({self.initial_replicas}) must be between min_replicas "
                             f"({self.min_replicas}) and max_replicas ({self.max_replicas})")
        if self.target_ongoing_requests <= 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")
        for name in ("upscale_delay_s", "downscale_delay_s", "retry_delay_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")


class ScalingPolicy:
    def __init__(self, config: AutoscalingConfig) -> None:
        self.config = config
        self._up_since: float | None = None
        self._down_since: float | None = None

    def desired(self, ongoing: int) -> int:
        c = self.config
        return min(c.max_replicas, max(c.min_replicas, math.ceil(ongoing / c.target_ongoing_requests)))

    def decide(self, now: float, current: int, ongoing: int) -> int:
        """The replica count to have now, given `current` (ready + starting) and `ongoing` requests."""
        want = self.desired(ongoing)
        c = self.config
        if current < c.min_replicas or current > c.max_replicas:
            self._up_since = self._down_since = None
            return want
        if want > current:
            self._down_since = None
            self._up_since = now if self._up_since is None else self._up_since
            if now - self._up_since >= c.upscale_delay_s:
                self._up_since = None
                return want
        elif want < current:
            self._up_since = None
            self._down_since = now if self._down_since is None else self._down_since
            if now - self._down_since >= c.downscale_delay_s:
                self._down_since = None
                return want
        else:
            self._up_since = self._down_since = None
        return current


class ResourceRequest(Protocol):
    def set(self, replicas: int) -> None:
        """Ask for room for `replicas` replicas at once (0: withdraw the request)."""


class RayResourceRequest:
    """`ray.autoscaler.sdk.request_resources` for whole replicas: each replica is `bundles`, its
    placement group's (one {"GPU": tp} bundle per pipeline stage: the autoscaler then picks node types
    that hold each stage's ranks; cluster/executors/placement.py). A request replaces the previous
    one; the autoscaler counts what is in use."""

    def __init__(self, bundles: list[dict[str, float]]) -> None:
        self.bundles = bundles
        self.replicas = 0

    def set(self, replicas: int) -> None:
        from ray.autoscaler.sdk import request_resources
        if replicas != self.replicas:
            request_resources(bundles=self.bundles * replicas)
            self.replicas = replicas


class Autoscaler:
    def __init__(self, router: Router, make_replica: Callable[[str], Replica], config: AutoscalingConfig,
                 clock: Callable[[], float] = time.monotonic,
                 resource_request: ResourceRequest | None = None) -> None:
        self.router = router
        self.make_replica = make_replica
        self.config = config
        self.policy = ScalingPolicy(config)
        self.clock = clock
        self.resource_request = resource_request
        self.starting: dict[str, asyncio.Task] = {}
        self.draining: set[asyncio.Task] = set()
        self.target = config.initial_replicas
        self._names = (f"replica-{i}" for i in itertools.count())
        self._retry_at = 0.0
        self._loop_task: asyncio.Task | None = None
        router.replaces_dead = lambda: self._loop_task is not None and not self._loop_task.done()
        router.replicas_wanted = lambda: self.target
        router.metrics.add_gauge("pagedray_replicas_starting", "Replicas being created", lambda: len(self.starting))
        router.metrics.add_gauge("pagedray_replicas_target", "Replicas the autoscaler aims for", lambda: self.target)

    @property
    def current(self) -> int:
        return self.router.num_ready + len(self.starting)

    async def start(self) -> None:
        """Create the initial replicas; return once one is ready (the rest keep starting in the
        background), then run the policy loop. Raises what the replicas raised if none starts."""
        tasks = [self._spawn() for _ in range(self.config.initial_replicas)]
        error: BaseException | None = None
        for next_done in asyncio.as_completed(tasks):
            try:
                await next_done
                break
            except Exception as exc:
                error = exc
        else:
            raise error
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                self.step()
            except Exception:  # a bug here must not stop serving
                logger.exception("autoscaler step failed")

    def step(self) -> None:
        """One policy round: replace dead replicas, then move toward the target."""
        for replica in list(self.router.replicas):
            if not replica.is_healthy and replica.name not in self.router.draining:
                logger.warning("replica %s is dead: removing it", replica.name)
                self._drain(replica)
        now = self.clock()
        current = self.current
        self.target = self.policy.decide(now, current, self.router.num_pending)
        if self.target > current and now >= self._retry_at:
            logger.info("scaling up: %d -> %d replicas (%d requests in flight)",
                        current, self.target, self.router.num_pending)
            self._request(self.target)
            for _ in range(self.target - current):
                self._spawn()
        elif self.target < current:
            logger.info("scaling down: %d -> %d replicas", current, self.target)
            self._request(0)
            self._scale_down(current - self.target)

    def _request(self, replicas: int) -> None:
        if self.resource_request is not None:
            self.resource_request.set(replicas)

    def _spawn(self) -> asyncio.Task:
        name = next(self._names)
        task = asyncio.get_running_loop().create_task(self._create(name))
        self.starting[name] = task
        task.add_done_callback(lambda t: t.cancelled() or t.exception())   # failures are logged in _create
        return task

    async def _create(self, name: str) -> Replica:
        replica = self.make_replica(name)
        try:
            await replica.start()
        except asyncio.CancelledError:
            await replica.shutdown()
            raise
        except Exception as exc:
            logger.error("replica %s failed to start: %s (retrying in %g s)", name, exc, self.config.retry_delay_s)
            self._retry_at = self.clock() + self.config.retry_delay_s
            raise
        finally:
            self.starting.pop(name, None)
        self.router.add_replica(replica)
        return replica

    def _scale_down(self, excess: int) -> None:
        for name in reversed(list(self.starting)):   # replicas not serving yet go first
            if excess == 0:
                return
            self.starting.pop(name).cancel()
            excess -= 1
        ready = sorted(self.router.routable(), key=lambda r: self.router.load.get(r.name, 0))
        for replica in ready[:excess]:
            self._drain(replica)

    def _drain(self, replica: Replica) -> None:
        task = asyncio.get_running_loop().create_task(
            self.router.remove_replica(replica, self.config.drain_timeout_s))
        self.draining.add(task)
        task.add_done_callback(self.draining.discard)

    async def stop(self) -> None:
        """Stop deciding; replicas still starting are shut down (the router's own shut down with it)."""
        tasks = [t for t in (self._loop_task, *self.starting.values(), *self.draining) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._request(0)
