"""Where a replica's processes go: one Ray placement group per replica.

A replica is `tensor_parallel_size x pipeline_parallel_size` ranks. Its group has **one bundle per
pipeline stage**, `{resource: tp}`: a bundle is never split across nodes, so a stage's TP ranks
(which all-reduce every layer) always share a node, while stages (one activation tensor per step
between them) may not. One stage: STRICT_PACK; several: PACK (one node when one can hold them all,
else as few as fit). Cross-node TP only when asked for (PAGEDRAY_RAY_CROSS_NODE_TP=1): then one bundle
per rank, PACK. The replica's engine-core actor sits in bundle 0 too, so the loss of one node takes
down at most the replicas that had a bundle there.

`Placer` (the driver's, shared by its replicas) decides which nodes a new group must avoid, written
as a Ray label selector on the node id: nodes that hold another replica of this driver, when the
rest of the cluster (now, or through the autoscaler) can hold the new one (replicas spread); and
nodes a failed replica had that no longer answer, until Ray declares them dead (Ray keeps offering
a silent node's resources until then: ~15 s by default, ~1.5 s with deploy/'s health checks).
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

GROUP_PREFIX = "pagedray-replica:"      # the placement groups of replicas (other replicas' nodes)
NODE_ID_LABEL = "ray.io/node-id"        # Ray labels every node with its id


@dataclass(frozen=True)
class ReplicaShape:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    resource: str = "GPU"
    cross_node_tp: bool = False
    core_resources: tuple[tuple[str, float], ...] = ()   # custom resources of the core actor (bundle 0)

    @classmethod
    def of(cls, tensor_parallel_size: int, pipeline_parallel_size: int, resource: str) -> "ReplicaShape":
        from pagedray.common import envs
        return cls(tensor_parallel_size, pipeline_parallel_size, resource, envs.ray_cross_node_tp())

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def bundles(self) -> list[dict[str, float]]:
        if self.cross_node_tp:
            bundles = [{self.resource: 1.0} for _ in range(self.world_size)]
        else:
            bundles = [{self.resource: float(self.tensor_parallel_size)} for _ in range(self.pipeline_parallel_size)]
        bundles[0].update(self.core_resources)
        return bundles

    @property
    def strategy(self) -> str:
        return "STRICT_PACK" if len(self.bundles) == 1 else "PACK"

    def bundle_index(self, rank: int) -> int:
        """Ranks are stage-major (rank = stage * tp + tp_rank): a stage's ranks share its bundle."""
        return rank if self.cross_node_tp else rank // self.tensor_parallel_size

    def describe(self) -> str:
        what = f"tensor_parallel_size={self.tensor_parallel_size}"
        if self.pipeline_parallel_size > 1:
            what += f" x pipeline_parallel_size={self.pipeline_parallel_size}"
        return what


# -- fitting ---------------------------------------------------------------------------------------------
def pack(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Whether the bundles fit the nodes' resources (first fit, largest bundles first)."""
    free = [dict(n) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        for node in sorted(free, key=lambda n: -sum(n.get(k, 0) for k in bundle)):
            if all(node.get(k, 0) >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] -= v
                break
        else:
            return False
    return True


def launchable_nodes(types: dict[str, dict] | None, cap: int = 64) -> list[dict[str, float]]:
    """The nodes the Ray autoscaler could add, each type up to its max_workers (capped)."""
    nodes = []
    for t in (types or {}).values():
        count = t["max_workers"] if t["max_workers"] >= 0 else cap
        nodes += [dict(t["resources"])] * min(count, cap)
    return nodes


def check_fits(shape: ReplicaShape) -> None:
    """ValueError unless the whole group fits the nodes alive now plus those the autoscaler can add:
    each stage's bundle on one node, all bundles together. A group that fits only nodes not up yet
    waits for the autoscaler (its placement group is pending demand)."""
    import ray
    from pagedray.cluster.executors.ray_utils import BOOTSTRAP_CONFIG, node_types
    alive = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    if pack(shape.bundles, alive):
        return
    r = shape.resource
    largest = max((n.get(r, 0) for n in alive), default=0)
    per_node = ("every rank needs one {r} on the same node" if shape.strategy == "STRICT_PACK" and not
                shape.cross_node_tp else "each stage's {tp} ranks need {tp} {r} on one node, "
                "{world} {r} in all").format(r=r, tp=shape.tensor_parallel_size, world=shape.world_size)
    need = (f"{shape.describe()} cannot fit: {per_node}, and the largest node of this Ray cluster has "
            f"{largest:g} {r} ({len(alive)} alive node(s), {sum(n.get(r, 0) for n in alive):g} {r} in all)")
    types = node_types()
    if types is None:
        raise ValueError(f"{need}; no autoscaler node types were found (GCS cluster config, "
                         f"$PAGEDRAY_AUTOSCALING_CONFIG or {BOOTSTRAP_CONFIG}), so no node will be added")
    if pack(shape.bundles, alive + launchable_nodes(types)):
        return
    listed = ", ".join(f"{name} has {t['resources'].get(r, 0):g}" for name, t in types.items()
                       if t["max_workers"] != 0) or "none can be launched"
    if len(shape.bundles) == 1:
        raise ValueError(f"{need}; nor can the autoscaler add one: no node type has "
                         f"{shape.bundles[0].get(r, 0):g} {r} ({listed})")
    raise ValueError(f"{need}; nor can the autoscaler add the nodes it needs ({listed}, "
                     f"each up to its max_workers)")


# -- the group --------------------------------------------------------------------------------------------
def replica_placement_group(shape: ReplicaShape, timeout_s: float):
    """(group, made_here): the group this process was scheduled in (a driver's replica), else a new one
    of `shape` (an executor used on its own, e.g. offline `LLM(executor="ray")`), once placed."""
    import ray
    from ray.util.placement_group import get_current_placement_group, placement_group
    current = get_current_placement_group()
    if current is not None:
        return current, False
    check_fits(shape)
    group = placement_group(shape.bundles, strategy=shape.strategy)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(group)
        raise TimeoutError(f"no nodes could reserve {shape.bundles} ({shape.strategy}) within {timeout_s:g} s; "
                           f"available now: {ray.available_resources()} (other replicas may hold them)")
    return group, True


def group_nodes(group) -> set[str]:
    """The node ids a placed group's bundles are on."""
    from ray.util import placement_group_table
    return set((placement_group_table(group).get("bundles_to_node_id") or {}).values())


def replica_nodes() -> dict[str, set[str]]:
    """Node id -> names of the replica groups (of any driver on this cluster) placed on it."""
    from ray.util import placement_group_table
    nodes: dict[str, set[str]] = {}
    for entry in placement_group_table().values():
        if entry.get("state") != "CREATED" or not str(entry.get("name", "")).startswith(GROUP_PREFIX):
            continue
        for node in (entry.get("bundles_to_node_id") or {}).values():
            nodes.setdefault(node, set()).add(entry["name"])
    return nodes


def raylet_answers(address: str, port: int, timeout_s: float = 1.0) -> bool:
    """Whether a node's raylet accepts a TCP connection (a dead machine refuses or stays silent)."""
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class Placer:
    """The driver's placement decisions for its replicas (one per driver, shared by its RayClients)."""

    def __init__(self) -> None:
        self.suspects: dict[str, float] = {}        # node id -> when a replica failed there
        self._probes: set[asyncio.Task] = set()
        self.lock = asyncio.Lock()                   # one group placed at a time: spreading sees the last

    def avoid(self, shape: ReplicaShape) -> set[str]:
        """Node ids a new replica group must not use."""
        import ray
        from pagedray.cluster.executors.ray_utils import node_types
        alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        for node in [n for n in self.suspects if n not in alive]:   # declared dead: no longer offered
            del self.suspects[node]
        avoid = set(self.suspects)
        used = set(replica_nodes()) - avoid
        if used:
            from ray._private.state import available_resources_per_node
            free = available_resources_per_node()
            rest = [free.get(node, {}) for node in alive if node not in avoid | used]
            if pack(shape.bundles, rest) or pack(shape.bundles, rest + launchable_nodes(node_types())):
                avoid |= used
        return avoid & set(alive)

    @staticmethod
    def selector(shape: ReplicaShape, avoid: set[str]) -> list[dict[str, str]] | None:
        if not avoid:
            return None
        return [{NODE_ID_LABEL: f"!in({','.join(sorted(avoid))})"}] * len(shape.bundles)

    async def create(self, shape: ReplicaShape, name: str):
        """A new placement group for replica `name` (not waited for beyond a moment: on an autoscaling
        cluster it may wait minutes for a node, and the lock must not)."""
        import ray
        from ray.util.placement_group import placement_group
        await self.settle()
        async with self.lock:
            avoid = self.avoid(shape)
            group = placement_group(shape.bundles, strategy=shape.strategy, name=f"{GROUP_PREFIX}{name}",
                                    bundle_label_selector=self.selector(shape, avoid))
            if avoid:
                logger.info("replica %s: placement avoids node(s) %s", name, ", ".join(sorted(a[:8] for a in avoid)))
            # Until placed (or a few seconds), so the next replica's decision sees where this one went.
            await asyncio.wait([asyncio.ensure_future(_ready(group))], timeout=5.0)
        return group

    def failed(self, nodes: set[str]) -> None:
        """A replica on `nodes` died: suspect them all now, then clear those whose raylet answers."""
        now = time.monotonic()
        for node in nodes:
            self.suspects[node] = now
        task = asyncio.get_running_loop().create_task(self._probe(set(nodes)))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, nodes: set[str]) -> None:
        import ray
        by_id = {n["NodeID"]: n for n in ray.nodes()}
        loop = asyncio.get_running_loop()
        for node in nodes:
            info = by_id.get(node)
            if info is None or not info.get("Alive"):
                continue        # declared dead: excluded by Ray itself
            ok = await loop.run_in_executor(None, raylet_answers, info["NodeManagerAddress"],
                                            info["NodeManagerPort"])
            if ok:
                self.suspects.pop(node, None)
            else:
                logger.warning("node %s (%s) does not answer: no replica goes there until Ray declares it "
                               "dead", node[:8], info["NodeManagerAddress"])

    async def settle(self) -> None:
        """Wait for the probes of failed replicas' nodes (a replacement must not plan before them)."""
        if self._probes:
            await asyncio.gather(*list(self._probes), return_exceptions=True)


async def _ready(group) -> None:
    await group.ready()
