"""RayClient: an engine core in a Ray actor, on the same ZMQ wire as a core process.

The actor (`CoreActor`) binds the core's two sockets on its node's address (tcp, free ports)
and runs the core loop of cluster/core/process.py in a thread of its own: the engine steps
without sharing its GIL with Ray's RPC threads, which only serve three light calls. The driver
connects with the shared `ZmqCoreClient` half, so adds, aborts and per-step CoreOutputs batches
never go through Ray's object store (docs/perf-notes/history.md: this against the old batched
long-poll of pickled per-request outputs).

Liveness: heartbeats bound a hung (e.g. SIGSTOPped) actor as for a core process; a `watch()`
call kept pending on the actor raises ActorDiedError the moment Ray sees the actor die. Either
way the actor is killed and its TP placement group (executor "ray") removed.

Placement (cluster/executors/placement.py): each replica is one placement group, made here, with
the actor in bundle 0: with executor "local" the actor holds that bundle's device (one GPU, or one
CPU); with executor "ray" its ranks hold the bundles (one per pipeline stage) and the executor finds
the group as its own. The driver's `Placer` spreads replicas over nodes and keeps a replacement off
the nodes of a replica that died until they answer again or Ray declares them dead.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import threading
import uuid
from typing import Any

import msgspec
import zmq

from pagedray.cluster.executors.placement import Placer
from pagedray.cluster.core.curve import CurveKeys, secure_core
from pagedray.cluster.core.process import DEFAULT_CORE_FACTORY, CoreStartup, bind_sockets, endpoint, serve
from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.ipc_dirs import make_ipc_dir
from pagedray.cluster.serving.process_client import ZmqCoreClient
from pagedray.common import envs

__all__ = ["RayClient", "CoreActor"]


class CoreActor:
    """Made a (threaded) Ray actor by RayClient: the core loop runs in `self.thread`, on sockets
    bound for its driver (ipc:// when the driver shares this node, else tcp:// on its address)."""

    def __init__(self, startup_bytes: bytes, registrations: dict, driver_node_id: str, ipc_dir: str,
                 keys_bytes: bytes) -> None:
        """`ipc_dir`: made (and removed, even when this actor is killed) by a driver on this node.
        `keys_bytes`: this replica's CURVE keys (curve.CurveKeys, no client secret), for tcp."""
        import ray
        startup = msgspec.msgpack.decode(startup_bytes, type=CoreStartup)
        self.context = zmq.Context()
        self.auth = None
        secure = None
        if driver_node_id == ray.get_runtime_context().get_node_id():
            inp, out = f"ipc://{ipc_dir}/in", f"ipc://{ipc_dir}/out"
        else:   # the node's cluster address, reachable by the whole cluster network: CURVE
            inp = out = f"tcp://{ray.util.get_node_ip_address()}:*"
            keys = msgspec.msgpack.decode(keys_bytes, type=CurveKeys)

            def secure(sockets):
                self.auth = secure_core(self.context, sockets, keys)
        inp, out = bind_sockets(self.context, inp, out, secure)
        self.endpoints = (endpoint(inp), endpoint(out))
        self.core: Any = None
        self.built = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(startup, inp, out, registrations),
                                       name="engine-core", daemon=True)
        self.thread.start()

    def _run(self, startup, inp, out, registrations) -> None:
        try:
            serve(startup, inp, out, registrations, self.stop, on_built=self._on_built)
        finally:
            self.built.set()
            self.stop.set()

    def _on_built(self, core: Any) -> None:
        self.core = core
        self.built.set()

    def addresses(self) -> tuple[str, str, int]:
        """The core's sockets and this actor's pid."""
        return (*self.endpoints, os.getpid())

    def watch(self) -> None:
        """Pending for the actor's whole life: its failure tells the driver the actor died."""
        self.stop.wait()

    def shutdown(self) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.auth is not None:
            self.auth.stop()


class RayClient(ZmqCoreClient):
    """An engine core in a Ray actor. `start()` creates the actor and waits for its model to load
    (on an autoscaling cluster, until the Ray autoscaler has brought up a node that fits)."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any] | None = None, *, name: str | None = None,
                 liveness_s: float | None = None, startup_timeout_s: float | None = None,
                 core_factory: str = DEFAULT_CORE_FACTORY, num_threads: int | None = None,
                 resources: dict[str, float] | None = None, placer: Placer | None = None) -> None:
        super().__init__(name or f"replica-{uuid.uuid4().hex[:8]}", liveness_s, startup_timeout_s)
        self.model = model
        self.engine_kwargs = dict(engine_kwargs or {})
        self.core_factory = core_factory
        self.num_threads = num_threads
        self.resources = dict(resources or {})   # extra custom Ray resources for the actor
        self.actor = None
        self.placement_group = None      # the replica's: made here, removed by _kill
        self.placer = placer or Placer()   # shared by a driver's replicas: they spread, avoid dead nodes
        self.nodes: set[str] = set()     # where the group was placed (suspects when the replica dies)
        self.keys = CurveKeys.make()     # this replica's: over tcp the core admits only this driver
        self.pid: int | None = None      # the actor's process (tests stop and kill it)
        self._watch: asyncio.Future | None = None
        self._ipc_dir: str | None = None

    def shape(self):
        """The replica's placement group: its ranks' bundles (executor "ray"), or one device bundle that
        the actor holds itself (executor "local"); the core actor and its custom resources in bundle 0."""
        from pagedray.cluster.executors.placement import ReplicaShape
        resource = "GPU" if self._device().startswith("cuda") else "CPU"
        extra = tuple(sorted(self.resources.items()))
        if self.engine_kwargs.get("executor", "local") == "ray":
            shape = ReplicaShape.of(int(self.engine_kwargs.get("tensor_parallel_size", 1)),
                                    int(self.engine_kwargs.get("pipeline_parallel_size", 1)), resource)
            return dataclasses.replace(shape, core_resources=extra)
        return ReplicaShape(1, 1, resource, core_resources=extra)

    def actor_options(self) -> dict:
        """In bundle 0 of the replica's group: the device when the actor runs the model itself (executor
        "local"), else nothing (its ranks hold the bundles)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        options = {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.placement_group, 0)}
        if self.resources:
            options["resources"] = self.resources
        if self.engine_kwargs.get("executor", "local") == "ray":
            return {"num_cpus": 0, **options}
        if self._device().startswith("cuda"):
            return {"num_gpus": 1, "num_cpus": 0, **options}
        return {"num_cpus": 1, **options}

    def _device(self) -> str:
        return str(self.engine_kwargs.get("device", "auto"))

    def _threads(self) -> int | None:
        """Ray starts a zero-CPU (GPU) actor with OMP_NUM_THREADS=1: give its engine the threads an
        in-process engine here would have. A CPU actor keeps the CPUs it reserved."""
        if envs.engine_threads():
            return envs.engine_threads()
        if self.num_threads or not self._device().startswith("cuda"):
            return self.num_threads
        import torch
        return torch.get_num_threads()

    async def start(self) -> None:
        import ray
        from pagedray.cluster.executors.placement import check_fits, group_nodes
        from pagedray.cluster.executors.ray_utils import can_have, forwarded_env, init_ray
        from pagedray.models.registry import ModelRegistry
        init_ray()
        if self._device() == "auto":
            # The driver may sit on a CPU head node: decide by what the cluster has or can launch.
            self.engine_kwargs["device"] = "cuda" if can_have("GPU") else "cpu"
        shape = self.shape()
        check_fits(shape)     # refused now rather than pending forever
        env = forwarded_env()
        # The replica's own TP placement group may wait for the Ray autoscaler to add a node.
        env.setdefault("PAGEDRAY_RAY_PLACEMENT_TIMEOUT_S", str(self.startup_timeout_s))
        startup = CoreStartup(self.model, self.engine_kwargs, "", "", self.heartbeat_s, self.core_factory,
                              env, self._threads())
        self._ipc_dir = make_ipc_dir("actor")
        try:
            self.placement_group = await self.placer.create(shape, self.name)
            actor_cls = ray.remote(CoreActor).options(**self.actor_options(), max_concurrency=4)
            self.actor = actor_cls.remote(self._wire.encode(startup), ModelRegistry.out_of_tree(),
                                          ray.get_runtime_context().get_node_id(), self._ipc_dir,
                                          self._wire.encode(self.keys.for_core()))
            inp, out, self.pid = await asyncio.wait_for(self.actor.addresses.remote(), self.startup_timeout_s)
            self._watch = asyncio.ensure_future(self.actor.watch.remote())
            self._watch.add_done_callback(self._on_watch_done)
            self._connect(inp, out, self.keys if inp.startswith("tcp://") else None)
            await self._await_info()
            self.nodes = group_nodes(self.placement_group)
        except asyncio.TimeoutError:
            await self.shutdown()
            raise EngineDeadError(f"engine {self.name} was not ready within {self.startup_timeout_s:g} s "
                                  f"(available: {ray.available_resources()})") from None
        except ValueError:
            await self.shutdown()
            raise
        except Exception as exc:
            await self.shutdown()
            if isinstance(exc, EngineDeadError):
                raise
            raise EngineDeadError(f"engine {self.name} failed to start: {_first_line(exc)}") from exc
        except BaseException:   # cancelled: the actor and the wire go too
            await self.shutdown()
            raise

    def _core_exit_cause(self) -> str | None:
        watch = self._watch
        if watch is None or not watch.done() or watch.cancelled():
            return None
        if watch.exception() is None:
            return None              # a normal stop
        return f"the engine actor died: {_first_line(watch.exception())}"

    def _on_watch_done(self, watch: asyncio.Future) -> None:
        cause = self._core_exit_cause()
        if cause is not None and self._reader is not None:   # during start-up, _await_info reports it
            self._die(cause)

    def _on_dead(self) -> None:
        if self.nodes:
            self.placer.failed(self.nodes)   # a replacement avoids them until they answer or are declared dead
        self._kill()

    def _kill(self) -> None:
        import ray
        if self.actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(self.actor, no_restart=True)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group
            with contextlib.suppress(Exception):
                remove_placement_group(self.placement_group)
            self.placement_group = None
        if self._ipc_dir is not None:   # a dead client may never be shut down
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    async def shutdown(self) -> None:
        """Stop the core (its TP workers and placement group go with it), then the actor."""
        if self._closed:
            return
        alive = self._dead_error is None and self._reader is not None
        try:
            await self._close_wire()
            if self.actor is not None and alive:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.actor.shutdown.remote(), 30.0)
        finally:   # even when cancelled
            self._kill()
            self._destroy_context()
        if self._watch is not None:   # returns once Ray has the actor dead (its resources free)
            with contextlib.suppress(Exception):    # ActorDiedError, or the timeout
                await asyncio.wait_for(asyncio.shield(self._watch), 30.0)
            self._watch.cancel()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
