"""The Router: which replica serves each request.

Per request it takes the healthy replica with the least outstanding work (in-flight
sequences it routed there: a request with n=4 counts 4), with prefix affinity: the
prompt's leading full KV blocks are hashed, one hash per depth (first block, first two,
...), and each depth remembers the replica that last took it. The deepest remembered
depth names the preferred replica, which gets the request while its load is within
`affinity_slack` of the least loaded; so requests sharing a system prompt land where its
blocks are already cached, until that replica is clearly busier than the rest.

Replicas are added and removed live: `remove_replica` drains (no new requests, waits
for in-flight ones) and then shuts the replica down.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import logging
import time
import uuid
from typing import Any, AsyncIterator, Callable

from pagedray.cluster.async_engine import EngineDeadError
from pagedray.cluster.core.block_hash import block_hashes
from pagedray.cluster.core.messages import EngineStats
from pagedray.cluster.metrics import ServingMetrics
from pagedray.cluster.outputs import RequestOutput
from pagedray.cluster.replica import LocalReplica, Replica
from pagedray.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["Router"]


class Router:
    def __init__(self, replicas: list[Replica] | tuple = (), *, affinity_slack: int = 8,
                 max_prefix_blocks: int = 32, max_affinity_entries: int = 1 << 16,
                 metrics: ServingMetrics | None = None) -> None:
        if affinity_slack < 0:
            raise ValueError(f"affinity_slack must be >= 0, got {affinity_slack}")
        self.affinity_slack = affinity_slack
        self.max_prefix_blocks = max_prefix_blocks
        self.max_affinity_entries = max_affinity_entries
        self.replicas: list[Replica] = []
        self.draining: set[str] = set()
        self.load: dict[str, int] = {}              # replica name -> in-flight sequences routed there
        self.routed: collections.Counter[str] = collections.Counter()   # requests ever routed, per replica
        self._inflight: dict[str, Replica] = {}
        self._affinity: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._rotation = 0
        self._callbacks: list[Callable[[], None]] = []
        self._info: Replica | None = None           # where model info comes from (the first replica added)
        self._tokenizer: Any = None
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.metrics.bind(lambda: self.stats_snapshot)
        self.metrics.add_gauge("pagedray_replicas", "Replicas taking requests", lambda: self.num_ready)
        self._tokens_total = 0   # output tokens seen by the router, for the throughput gauge
        for replica in replicas:
            self.add_replica(replica)

    @classmethod
    def wrap(cls, engine) -> "Router":
        """One in-process AsyncEngine, its own metrics kept (what GenerateServer(engine) did before)."""
        return cls([LocalReplica(engine)], metrics=engine.metrics)

    # -- the replica set ------------------------------------------------------------------
    def add_replica(self, replica: Replica) -> None:
        if any(r.name == replica.name for r in self.replicas):
            raise ValueError(f"replica name {replica.name!r} is already in use")
        self.replicas.append(replica)
        self.load.setdefault(replica.name, 0)
        if self._info is None:
            self._info = replica
            self._tokenizer = copy.deepcopy(replica.tokenizer)  # ours: the engine thread uses the original
        replica.on_dead(lambda error: self._notify())
        logger.info("replica %s added (%d ready)", replica.name, self.num_ready)
        self._notify()

    async def remove_replica(self, replica: Replica, timeout: float | None = None) -> None:
        """Drain: stop routing to it, wait for its in-flight requests (up to `timeout`), shut it down."""
        self.draining.add(replica.name)
        self._notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.load.get(replica.name) and replica.is_healthy:
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("replica %s: %d sequences still in flight at the drain deadline",
                               replica.name, self.load[replica.name])
                break
            await asyncio.sleep(0.05)
        await replica.shutdown()
        self.replicas = [r for r in self.replicas if r is not replica]
        self.draining.discard(replica.name)
        self.load.pop(replica.name, None)
        self._affinity = collections.OrderedDict((h, n) for h, n in self._affinity.items() if n != replica.name)
        logger.info("replica %s removed (%d ready)", replica.name, self.num_ready)
        self._notify()

    def routable(self) -> list[Replica]:
        return [r for r in self.replicas if r.is_healthy and r.name not in self.draining]

    @property
    def num_ready(self) -> int:
        return len(self.routable())

    @property
    def is_healthy(self) -> bool:
        return self.num_ready > 0

    @property
    def num_pending(self) -> int:
        """Requests in flight through this router."""
        return len(self._inflight)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback()` on the event loop when a replica is added, removed, drained or dies."""
        self._callbacks.append(callback)

    def _notify(self) -> None:
        for callback in self._callbacks:
            callback()

    # -- model info (every replica serves the same model) ----------------------------------------
    def _first(self) -> Replica:
        if self._info is None:
            raise EngineDeadError("no replica has been added yet")
        return self._info

    model_config = property(lambda self: self._first().model_config)
    tokenizer = property(lambda self: self._first().tokenizer)
    tensor_parallel_size = property(lambda self: self._first().tensor_parallel_size)

    @property
    def stats_snapshot(self) -> EngineStats | None:
        """The replicas' latest stats, summed (the hit rate weighted by prompt tokens)."""
        stats = [s for r in self.replicas if (s := r.stats_snapshot) is not None]
        return _sum_stats(stats) if stats else None

    async def get_stats(self) -> EngineStats:
        return _sum_stats(await asyncio.gather(*[r.get_stats() for r in self.routable()]))

    # -- choosing ---------------------------------------------------------------------------------
    def choose(self, prompt: str | dict) -> Replica:
        candidates = self.routable()
        if not candidates:
            raise EngineDeadError(f"no healthy replica to serve the request ({len(self.replicas)} known, "
                                  f"{len(self.draining)} draining)")
        hashes = self._hashes(prompt, candidates[0].block_size)
        least = min(self.load[r.name] for r in candidates)
        by_name = {r.name: r for r in candidates}
        chosen = None
        for h in reversed(hashes):   # the deepest shared prefix first
            name = self._affinity.get(h)
            if name in by_name:
                if self.load[name] <= least + self.affinity_slack:
                    chosen = by_name[name]
                break
        if chosen is None:
            tied = [r for r in candidates if self.load[r.name] == least]
            self._rotation += 1
            chosen = tied[self._rotation % len(tied)]   # rotate among equals so idle replicas all get work
        for h in hashes:
            self._affinity[h] = chosen.name
            self._affinity.move_to_end(h)
        while len(self._affinity) > self.max_affinity_entries:
            self._affinity.popitem(last=False)
        return chosen

    def _hashes(self, prompt: str | dict, block_size: int) -> list[bytes]:
        if isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids")
        elif isinstance(prompt, str) and self._tokenizer is not None:
            ids = self._tokenizer.encode(prompt)
        else:
            ids = None
        if not isinstance(ids, (list, tuple)):
            return []   # bad input: the engine names the problem
        return block_hashes(list(ids), block_size, self.max_prefix_blocks)

    # -- requests ----------------------------------------------------------------------------------
    async def generate(self, prompt: str | dict, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """The chosen replica's cumulative outputs. Raises ValueError, QueueFullError, EngineDeadError
        (no healthy replica, or the replica failed mid-request); closing early aborts the request."""
        params = params if params is not None else SamplingParams()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        if request_id in self._inflight:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        replica = self.choose(prompt)
        self._inflight[request_id] = replica
        self.load[replica.name] += params.n
        self.routed[replica.name] += 1
        observer = None if replica.self_observed_metrics is self.metrics else _Observer(self)
        try:
            async with contextlib.aclosing(replica.generate(prompt, params, request_id)) as outputs:
                async for out in outputs:
                    if observer is not None:
                        observer.on_output(out)
                    yield out
        finally:
            self._inflight.pop(request_id, None)
            if replica.name in self.load:
                self.load[replica.name] -= params.n

    async def abort(self, request_id: str) -> None:
        replica = self._inflight.get(request_id)
        if replica is not None:
            await replica.abort(request_id)

    async def shutdown(self) -> None:
        await asyncio.gather(*[r.shutdown() for r in self.replicas], return_exceptions=True)


class _Observer:
    """Latency metrics of one request seen from the router, for replicas whose engines run
    elsewhere (their own metrics stay in their process)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.tokens = 0

    def on_output(self, out: RequestOutput) -> None:
        now = time.monotonic()
        metrics = self.router.metrics
        tokens = sum(len(c.token_ids) for c in out.outputs)
        if tokens > self.tokens:
            self.router._tokens_total += tokens - self.tokens
            metrics.throughput.record(self.router._tokens_total, now)
            self.tokens = tokens
        if self.first_token is None and tokens:
            self.first_token = now
            metrics.observe_ttft(now - self.arrival)
        if not out.finished:
            return
        longest = max((len(c.token_ids) for c in out.outputs), default=0)
        if self.first_token is not None and longest > 1:
            metrics.observe_tpot((now - self.first_token) / (longest - 1))
        for c in out.outputs:
            metrics.observe_finished(c.finish_reason or "abort")
        metrics.observe_e2e(now - self.arrival)


def _sum_stats(stats: list[EngineStats]) -> EngineStats:
    if len(stats) == 1:
        return stats[0]
    # Every field is a count to add up, except the hit rate, which is weighted by prompt tokens.
    total = EngineStats(**{f: sum(getattr(s, f) for s in stats) for f in EngineStats.__struct_fields__})
    weights = total.prompt_tokens_total
    total.prefix_cache_hit_rate = (sum(s.prefix_cache_hit_rate * s.prompt_tokens_total for s in stats) / weights
                                   if weights else 0.0)
    return total
