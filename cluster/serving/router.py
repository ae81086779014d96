"""The Router: which engine client serves each request. It only chooses; the Frontend owns requests.

Per request it takes the ready client with the least outstanding tokens (prompt + max_tokens of
every completion routed there, less the tokens they produced since), with prefix affinity: the
prompt's leading full KV blocks are keyed with the BlockManager's own hash (core/block_hash.py),
one key per depth, and each depth remembers the client that last took it. The deepest remembered
depth names the preferred client, which gets the request while its load is within
`affinity_slack` tokens of the least loaded; so requests sharing a system prompt land where its
blocks are already cached, until that client is clearly busier than the rest.

Clients are added and removed live: `remove_replica` drains (no new requests, waits for in-flight
ones) and then shuts the client down; `drop` takes a dead one out at once (the Frontend migrates
its requests). A client whose `dead_error` is set is never chosen.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

from pagedray.cluster.core.block_hash import block_hashes
from pagedray.cluster.serving.metrics import ServingMetrics
from pagedray.cluster.serving.engine_client import EngineClient
from pagedray.common.errors import EngineDeadError
from pagedray.common.lora import LoRARequest

logger = logging.getLogger(__name__)

__all__ = ["Router"]


class Router:
    def __init__(self, clients: list[EngineClient] | tuple = (), *, affinity_slack: int = 4096,
                 max_prefix_blocks: int = 32, max_affinity_entries: int = 1 << 16,
                 metrics: ServingMetrics | None = None) -> None:
        if affinity_slack < 0:
            raise ValueError(f"affinity_slack must be >= 0 tokens, got {affinity_slack}")
        self.affinity_slack = affinity_slack
        self.max_prefix_blocks = max_prefix_blocks
        self.max_affinity_entries = max_affinity_entries
        self.replicas: list[EngineClient] = []
        self.draining: set[str] = set()
        self.load: dict[str, int] = {}              # client name -> outstanding tokens routed there
        self.routed: collections.Counter[str] = collections.Counter()   # requests ever routed, per client
        self._inflight: dict[str, tuple[EngineClient, int]] = {}        # request id -> (client, weight left)
        self._affinity: collections.OrderedDict[bytes, str] = collections.OrderedDict()
        self._lora_clients: dict[int, set[str]] = {}   # lora_int_id -> clients that have run it
        self._rotation = 0
        self._callbacks: list[Callable[[], None]] = []
        # Set by an Autoscaler while it runs: a dead replica's replacement is coming, so the frontend
        # parks the requests it could not move (the only replica died) instead of failing them.
        self.replaces_dead: Callable[[], bool] | None = None
        self.replicas_wanted: Callable[[], int] | None = None   # the autoscaler's target (ListModels' total)
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.metrics.add_gauge("pagedray_replicas", "Replicas taking requests", lambda: self.num_ready)
        for client in clients:
            self.add_replica(client)

    # -- the client set ---------------------------------------------------------------------
    def add_replica(self, client: EngineClient) -> None:
        """Add a started client."""
        if any(r.name == client.name for r in self.replicas):
            raise ValueError(f"replica name {client.name!r} is already in use")
        self.replicas.append(client)
        self.load.setdefault(client.name, 0)
        logger.info("replica %s added (%d ready)", client.name, self.num_ready)
        self._notify()

    def drop(self, client: EngineClient) -> None:
        """Take a (dead) client out of routing at once; its requests are the caller's to move."""
        if client not in self.replicas:
            return
        self.replicas = [r for r in self.replicas if r is not client]
        self.draining.discard(client.name)
        self.load.pop(client.name, None)
        self._affinity = collections.OrderedDict((h, n) for h, n in self._affinity.items() if n != client.name)
        logger.warning("replica %s taken out of routing (%d ready)", client.name, self.num_ready)
        self._notify()

    async def remove_replica(self, client: EngineClient, timeout: float | None = None) -> None:
        """Drain: stop routing to it, wait for its in-flight requests (up to `timeout`), shut it down."""
        self.draining.add(client.name)
        self._notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.num_inflight_on(client) and client.is_healthy:
            if deadline is not None and time.monotonic() > deadline:
                logger.warning("replica %s: %d requests still in flight at the drain deadline",
                               client.name, self.num_inflight_on(client))
                break
            await asyncio.sleep(0.05)
        await client.shutdown()
        self.drop(client)

    def routable(self) -> list[EngineClient]:
        return [r for r in self.replicas if r.is_healthy and r.name not in self.draining]

    @property
    def num_ready(self) -> int:
        return len(self.routable())

    @property
    def num_wanted(self) -> int:
        """Replicas this server keeps: the autoscaler's target, else the clients it has."""
        return self.replicas_wanted() if self.replicas_wanted is not None else len(self.replicas)

    @property
    def is_healthy(self) -> bool:
        return self.num_ready > 0

    @property
    def num_pending(self) -> int:
        """Requests in flight (what the autoscaler scales on)."""
        return len(self._inflight)

    def num_inflight_on(self, client: EngineClient) -> int:
        return sum(1 for c, _ in self._inflight.values() if c is client)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call `callback()` when a client is added, removed, drained or dropped."""
        self._callbacks.append(callback)

    def notify(self) -> None:
        """Tell the listeners the client set (or what depends on it) changed."""
        self._notify()

    def _notify(self) -> None:
        for callback in self._callbacks:
            callback()

    # -- choosing ----------------------------------------------------------------------------
    def choose(self, prompt_token_ids: list[int], exclude: tuple[EngineClient, ...] = (),
               lora_request: LoRARequest | None = None) -> EngineClient:
        """The client for a prompt (run with `lora_request`'s adapter, if given); EngineDeadError when
        none is ready. A LoRA request's prefix is keyed with its adapter (the cores' own keys) and,
        without a prefix to follow, goes where its adapter already ran, under the same slack."""
        candidates = [r for r in self.routable() if r not in exclude]
        if not candidates:
            raise EngineDeadError(f"no healthy replica to serve the request ({len(self.replicas)} known, "
                                  f"{len(self.draining)} draining)")
        salt = lora_request.cache_salt() if lora_request is not None else b""
        hashes = block_hashes(prompt_token_ids, candidates[0].info.block_size, self.max_prefix_blocks, salt)
        least = min(self.load[r.name] for r in candidates)
        by_name = {r.name: r for r in candidates}
        chosen = None
        for h in reversed(hashes):   # the deepest shared prefix first
            name = self._affinity.get(h)
            if name in by_name:
                if self.load[name] <= least + self.affinity_slack:
                    chosen = by_name[name]
                break
        if chosen is None and lora_request is not None:
            chosen = self._lora_home(lora_request.lora_int_id, by_name, least)
        if chosen is None:
            tied = [r for r in candidates if self.load[r.name] == least]
            self._rotation += 1
            chosen = tied[self._rotation % len(tied)]   # rotate among equals so idle clients all get work
        for h in hashes:
            self._affinity[h] = chosen.name
            self._affinity.move_to_end(h)
        while len(self._affinity) > self.max_affinity_entries:
            self._affinity.popitem(last=False)
        if lora_request is not None:
            self._lora_clients.setdefault(lora_request.lora_int_id, set()).add(chosen.name)
        return chosen

    def _lora_home(self, lora_int_id: int, by_name: dict[str, EngineClient], least: int) -> EngineClient | None:
        """The least loaded client that already has the adapter, if within the slack."""
        homes = [by_name[n] for n in self._lora_clients.get(lora_int_id, ()) if n in by_name]
        if not homes:
            return None
        best = min(homes, key=lambda r: self.load[r.name])
        return best if self.load[best.name] <= least + self.affinity_slack else None

    # -- load bookkeeping (the Frontend calls these) ------------------------------------------
    def assign(self, request_id: str, client: EngineClient, weight: int) -> None:
        """`request_id` now runs on `client`, with `weight` tokens still to compute."""
        self.release(request_id)
        self._inflight[request_id] = (client, weight)
        self.load[client.name] = self.load.get(client.name, 0) + weight
        self.routed[client.name] += 1

    def progress(self, request_id: str, tokens: int) -> None:
        """The request produced `tokens` more tokens."""
        entry = self._inflight.get(request_id)
        if entry is not None:
            client, left = entry
            done = min(left, tokens)
            self._inflight[request_id] = (client, left - done)
            if client.name in self.load:
                self.load[client.name] -= done

    def release(self, request_id: str) -> None:
        entry = self._inflight.pop(request_id, None)
        if entry is not None and entry[0].name in self.load:
            self.load[entry[0].name] -= entry[1]

    async def shutdown(self) -> None:
        await asyncio.gather(*[r.shutdown() for r in self.replicas], return_exceptions=True)
