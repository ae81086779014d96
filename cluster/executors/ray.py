"""The Ray executor: one replica sharded over tensor_parallel_size x pipeline_parallel_size Ray actors.

Start-up: the replica's placement group (cluster/executors/placement.py: the one the driver
placed this core in, else one of its own; a stage's ranks share a bundle, so a node); one
`WorkerActor` per rank, ranks stage-major (rank = stage * tp + tp_rank); torch.distributed over
NCCL (gloo on CPU) at a `tcp://` address on rank 0's node that the executor picks; every rank
loads its shard (its stage's layers) and profiles; the KV cache gets the minimum block count
over ranks. The step's output comes from the last stage's first rank.

Pipeline parallelism: `execute_model_async` returns as soon as a step is submitted, so the
engine core keeps up to pipeline_parallel_size steps in flight; each actor runs its calls
in submission order, so stage 0 runs step N+1 while stage 1 runs step N.

Per step the driver sends one `SchedulerOutput` (new requests whole, running ones as
deltas) to every rank and reads the sampled tokens from rank 0. Two transports:
"calls" (one actor call per rank) and "dag" (a Ray compiled graph: the step is
serialized once into shared-memory channels that the actors poll). Which is the default
is decided by `benchmarks/ray_step_overhead.py`; see docs/perf-notes/history.md.

Failure: any rank that dies or raises makes `execute_model` raise `ExecutorError` (within
the time Ray needs to notice a dead process, about a second), never a hang: results are
awaited with `ray.wait` so that one failed rank is seen even while the others block in a
collective, and every wait has a deadline. The executor is then dead; `shutdown()`
kills its actors and frees the placement group, and a new executor can be built.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import ray
from ray.exceptions import RayTaskError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from pagedray.cluster.config import EngineConfig
from pagedray.cluster.executors.base import Executor, ExecutorError, check_num_kv_blocks
from pagedray.cluster.executors.placement import ReplicaShape, group_nodes, replica_placement_group
from pagedray.cluster.executors.ray_utils import WorkerActor, forwarded_env, init_ray
from pagedray.models.registry import ModelRegistry
from pagedray.common.messages import ModelRunnerOutput, SchedulerOutput
from pagedray.common import envs
from pagedray.workers.step_output import StepOutput

logger = logging.getLogger(__name__)

TRANSPORTS = ("calls", "dag")


def default_transport(device_type: str, pipeline_parallel_size: int = 1) -> str:
    """Compiled graphs on GPU: 0.46 ms of driver overhead per decode step at TP=2 against 1.37 ms for
    actor calls (2xH200, docs/perf-notes/history.md). Actor calls on CPU, where the compiled graph's
    polling actors (~30% of a core each, even idle) would take cores from the ranks' compute.
    Actor calls under pipeline parallelism: they let several steps be in flight (see the module doc)."""
    default = "dag" if device_type == "cuda" and pipeline_parallel_size == 1 else "calls"
    choice = envs.ray_transport() or default
    if choice not in TRANSPORTS:
        raise ValueError(f"PAGEDRAY_RAY_TRANSPORT must be one of {TRANSPORTS}, got {choice!r}")
    return choice


class _RayStep(StepOutput):
    """A step submitted to every rank; `get()` waits for all of them (any failure raises)."""

    def __init__(self, executor: "RayExecutor", refs: list) -> None:
        super().__init__([], None)
        self._executor, self._refs = executor, refs

    def get(self) -> ModelRunnerOutput:
        if self._result is None:
            outs = self._executor._wait(self._refs, self._executor.step_timeout_s, "a step")
            self._result = outs[self._executor.output_rank]
        return self._result


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, transport: str | None = None,
                 step_timeout_s: float | None = None, worker_cls: type = WorkerActor) -> None:
        self.config = config
        self.worker_cls = worker_cls   # the rank actor's class (vLLM's worker_cls): WorkerActor or a subclass
        self.tp = config.parallel.tensor_parallel_size
        self.pp = config.parallel.pipeline_parallel_size
        self.world = self.tp * self.pp
        self.output_rank = (self.pp - 1) * self.tp   # the last stage's first rank samples
        device_type = config.device.device_type
        self.transport = transport or default_transport(device_type, self.pp)
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.transport == "dag" and self.pp > 1:
            raise ValueError("transport 'dag' runs one step at a time; pipeline_parallel_size > 1 needs 'calls'")
        # A step longer than this is a hang (e.g. a collective whose peer is wedged, not dead).
        self.step_timeout_s = step_timeout_s or envs.ray_step_timeout_s()
        self.startup_timeout_s = envs.ray_startup_timeout_s()
        self.workers: list[Any] = []
        self.placement_group = None
        self._own_group = False       # made here (removed at shutdown), not the driver's replica group
        self._dag = None
        self._failure: str | None = None
        self._closed = False
        self._started = False
        try:
            self._start(device_type)
        except BaseException:
            self.shutdown()
            raise

    # -- start-up ------------------------------------------------------------
    def _start(self, device_type: str) -> None:
        resource = "GPU" if device_type == "cuda" else "CPU"
        init_ray()
        shape = ReplicaShape.of(self.tp, self.pp, resource)
        try:   # the replica's group when a driver placed this core in one, else one of our own
            self.placement_group, self._own_group = replica_placement_group(
                shape, envs.ray_placement_timeout_s())
        except TimeoutError as exc:
            raise ExecutorError(str(exc)) from None
        ip, port = self._start_ranks(resource, shape)
        init_method = f"tcp://{ip}:{port}"
        registrations = ModelRegistry.out_of_tree()   # user-registered models: the ranks start without them
        blocks = self._wait([w.start.remote(self.config, init_method, registrations) for w in self.workers],
                            self.startup_timeout_s, "loading the model")
        num_blocks = min(blocks)
        check_num_kv_blocks(num_blocks, self.config.cache, f" (blocks per rank: {blocks})")
        self.num_kv_blocks = num_blocks
        self._wait([w.initialize_cache.remote(num_blocks) for w in self.workers], self.startup_timeout_s,
                   "allocating the KV cache")
        if self.transport == "dag":
            self._dag = self._compile_dag()
        self._started = True
        logger.info("ray executor: tp=%d pp=%d on %s, %d KV blocks per rank, transport=%s",
                    self.tp, self.pp, init_method, num_blocks, self.transport)

    def _start_ranks(self, resource: str, shape: ReplicaShape, attempts: int = 3) -> tuple[str, int]:
        """One actor per rank, and rank 0's rendezvous address. Ranks that die before holding anything
        (Ray can fail a fresh actor's worker process at start-up: one that does not register in time
        on a loaded host, or that the memory monitor kills) are replaced, up to `attempts` rounds."""
        actor_cls = ray.remote(self.worker_cls)
        # An actor asks for one CPU by default, which a {"GPU": 1} bundle does not hold: GPU ranks ask for none.
        per_rank = {"num_gpus": 1, "num_cpus": 0} if resource == "GPU" else {"num_cpus": 1}
        env = forwarded_env()
        for attempt in range(1, attempts + 1):
            self.workers = [
                actor_cls.options(**per_rank, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=shape.bundle_index(rank))).remote(rank, env)
                for rank in range(self.world)]
            try:
                if len(group_nodes(self.placement_group)) > 1:   # collectives cross nodes: the node IP's interface
                    self._wait([w.use_node_interface.remote() for w in self.workers], 60.0, "choosing the interface")
                addresses = self._wait([w.rendezvous_address.remote() for w in self.workers],
                                       self.startup_timeout_s, "finding a rendezvous port")
                return addresses[0]
            except ExecutorError as exc:
                if attempt == attempts or "died" not in str(exc):
                    raise
                logger.warning("ray executor start-up, attempt %d of %d: %s; starting the ranks again",
                               attempt, attempts, self._failure)
                self._kill_workers()
                self._failure = None
        raise AssertionError("unreachable")

    def _compile_dag(self):
        from ray.dag import InputNode, MultiOutputNode
        with InputNode() as sched:
            dag = MultiOutputNode([w.execute_model.bind(sched) for w in self.workers])
        return dag.experimental_compile()

    # -- one step ------------------------------------------------------------
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        if self._dag is None:
            return self.execute_model_async(sched).get()
        self._check_usable()
        try:
            return ray.get(self._dag.execute(sched), timeout=self.step_timeout_s)[self.output_rank]
        except Exception as exc:
            raise self._fail("a step", exc) from exc

    def execute_model_async(self, sched: SchedulerOutput) -> StepOutput:
        """Submit the step to every rank and return; `get()` waits for it (actor calls only)."""
        if self._dag is not None:
            return StepOutput.done(self.execute_model(sched))
        self._check_usable()
        return _RayStep(self, [w.execute_model.remote(sched) for w in self.workers])

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise ExecutorError(f"the executor has failed before: {self._failure}")
        if self._closed:
            raise ExecutorError("the executor is shut down")

    def _wait(self, refs: list, timeout: float, what: str) -> list:
        """All results in order; the first failure of any rank raises at once, even while others block."""
        index = {ref: i for i, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise self._fail(what, TimeoutError(f"no result after {timeout:g} s"))
            try:
                results[index[ready[0]]] = ray.get(ready[0])
            except Exception as exc:
                raise self._fail(what, exc) from exc
        return results

    def _fail(self, what: str, exc: BaseException) -> Exception:
        """Mark the executor dead and build the error: a worker's ValueError stays a ValueError."""
        cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
        if isinstance(cause, ValueError) and not self._started:  # bad configuration, e.g. heads % tp
            return ValueError(str(cause))
        dead = self._dead_ranks()
        who = f"rank(s) {dead} of {self.world} died" if dead else "a rank failed"
        self._failure = f"{who} during {what}: {type(cause).__name__}: {_why(cause)}"
        return ExecutorError(f"tensor-parallel worker failure: {self._failure}; the replica cannot continue "
                             f"(shut this executor down and build a new one)")

    def _dead_ranks(self, timeout: float = 2.0) -> list[int]:
        """Ranks whose actor does not answer a ping (dead ones answer with an error at once)."""
        refs = {w.ping.remote(): rank for rank, w in enumerate(self.workers)}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        dead = []
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:
                dead.append(refs[ref])
        return sorted(dead)

    # -- health and teardown -------------------------------------------------
    def check_health(self) -> None:
        if self._failure is not None:
            raise ExecutorError(f"the executor has failed: {self._failure}")
        self._wait([w.ping.remote() for w in self.workers], 30.0, "a health check")

    def add_lora(self, lora_request) -> bool:
        """Every rank parses its shard of the adapter (a bad adapter: every rank's same ValueError)."""
        refs = [w.add_lora.remote(lora_request) for w in self.workers]
        try:
            return ray.get(refs, timeout=self.step_timeout_s)[0]
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ValueError):   # the adapter's fault, not the replica's
                raise ValueError(str(exc.cause)) from None
            raise self._fail("adding a LoRA adapter", exc) from exc

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._wait([w.remove_lora.remote(lora_int_id) for w in self.workers], self.step_timeout_s,
                          "removing a LoRA adapter")[0]

    def shutdown(self) -> None:
        """Kill the actors (a rank stuck in a collective cannot be asked to leave) and free the bundles."""
        if self._closed:
            return
        self._closed = True
        if self._dag is not None and self._failure is None:
            self._teardown_dag()   # healthy: stop the graph's loops first, then the actors
        self._kill_workers()
        if self._dag is not None:
            # Failed: a rank may sit in a collective and never answer the graph's cancel; kill first.
            self._teardown_dag()
        if self.placement_group is not None and self._own_group:
            try:
                remove_placement_group(self.placement_group)
            except Exception as exc:
                logger.debug("placement group removal: %s", exc)
        self.workers = []

    def _kill_workers(self, timeout: float = 10.0) -> None:
        """Kill every rank's actor and wait (up to `timeout`) until Ray reports each dead, so the next
        executor built right after this one never overlaps with processes still on their way out."""
        pings = []
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
                pings.append(w.ping.remote())
            except Exception:  # already dead
                pass
        if pings:
            ray.wait(pings, num_returns=len(pings), timeout=timeout)   # a killed actor's call fails at once
        self.workers = []

    def _teardown_dag(self) -> None:
        # Ray logs every dead actor's failed cancel with a traceback; after a failure that is expected.
        dag_logger = logging.getLogger("ray.dag.compiled_dag_node")
        level = dag_logger.level
        if self._failure is not None:
            dag_logger.setLevel(logging.CRITICAL)
        try:
            self._dag.teardown()
        except Exception as exc:
            logger.debug("compiled graph teardown: %s", exc)
        finally:
            dag_logger.setLevel(level)
            self._dag = None


def _why(cause: BaseException) -> str:
    """The first line of an error, plus Ray's reason when an actor died (its later lines say why:
    "...worker process has died. Worker exit type: ...", which the first line does not)."""
    lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
    if not lines:
        return type(cause).__name__
    reasons = [line for line in lines[1:] if "because" in line or "exit type" in line.lower()]
    return " ".join([lines[0], *reasons])[:600]
