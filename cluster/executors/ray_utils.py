"""Ray plumbing for the Ray executor: connecting to Ray, fit checks, the worker actor.

Kept apart from `ray.py` so that the executor reads as the protocol (start-up
order, one step, failure) and this file holds the mechanics.
"""
from __future__ import annotations

import collections
import os
import socket
import time
from typing import Any

import ray
from pagedray.common import envs

# Settings a driver sets for its collectives that must also hold on every rank, even on another node.
FORWARDED_ENV_PREFIXES = ("NCCL_", "GLOO_", "NVSHMEM_", "TORCH_SYMM_MEM_", "TORCH_NCCL_", "PAGEDRAY_")


def init_ray(num_cpus: int | None = None) -> None:
    """Join the running cluster (RAY_ADDRESS, or one started by `ray start` here), else start a local one
    (RAY_ADDRESS=local: always a new local one, as for ray.init)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS") == "local":
        start_local_ray(num_cpus)
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return
    try:
        ray.init(address="auto", log_to_driver=False)
    except ConnectionError:
        start_local_ray(num_cpus)


_watchdog = None   # holds the pipe whose EOF tells the watchdog this process is gone


def start_local_ray(num_cpus: int | None = None) -> None:
    """A Ray of this process's own that goes away with it, even on SIGKILL (see ray_watchdog)."""
    global _watchdog
    from pagedray.cluster.executors.ray_watchdog import descendants, watch
    before = descendants(os.getpid())
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    started = {pid: start for pid, start in descendants(os.getpid()).items() if pid not in before}
    _watchdog = watch(started)


# Where `ray up` leaves the autoscaler's config on the head node (the driver runs there under `ray submit`).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


def node_types() -> dict[str, dict] | None:
    """The node types the Ray autoscaler can launch: {name: {"resources": {...}, "max_workers": n}}, or
    None when no autoscaler config can be found (then the nodes alive now are all there will be).

    Read from the cluster config the autoscaler reports to the GCS (what Ray Data reads) when there is
    one, else from the autoscaling config file: $PAGEDRAY_AUTOSCALING_CONFIG, or the one `ray up`
    writes on the head node.
    """
    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return {g.name: {"resources": dict(g.resources), "max_workers": g.max_count}
                for g in config.node_group_configs}
    path = os.path.expanduser(envs.autoscaling_config() or BOOTSTRAP_CONFIG)
    if not os.path.exists(path):
        return None
    import yaml
    with open(path) as f:
        types = (yaml.safe_load(f) or {}).get("available_node_types") or {}
    return {name: {"resources": t.get("resources") or {}, "max_workers": t.get("max_workers", 0)}
            for name, t in types.items()}


def check_fits(tensor_parallel_size: int, resource: str) -> None:
    """ValueError unless one replica of `tensor_parallel_size` ranks fits (placement.check_fits)."""
    from pagedray.cluster.executors.placement import ReplicaShape, check_fits as fits
    fits(ReplicaShape.of(tensor_parallel_size, 1, resource))


def can_have(resource: str) -> bool:
    """Whether a node with `resource` is alive or of a type the autoscaler can launch."""
    if ray.cluster_resources().get(resource, 0) > 0:
        return True
    types = node_types() or {}
    return any(t["resources"].get(resource, 0) and t["max_workers"] != 0 for t in types.values())


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def interface_of(ip: str) -> str | None:
    """The network interface that holds the IPv4 address `ip` (Linux), or None."""
    import fcntl
    import struct
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:   # no IPv4 address
                continue
            if socket.inet_ntoa(raw[20:24]) == ip:
                return name
    return None


class WorkerActor:
    """One tensor-parallel rank: a thin shell around `Worker`, made a Ray actor by the executor.

    The Worker is built in `start`, not in `__init__`, because its rendezvous address
    (rank 0's node and a free port there) is only known once rank 0's actor exists.
    """

    def __init__(self, rank: int, env: dict[str, str]) -> None:
        os.environ.update(env)
        self.rank = rank
        self.worker = None
        # Seconds each step spent inside Worker.execute_model (benchmarks read the driver's overhead from it).
        self.step_seconds: collections.deque[float] = collections.deque(maxlen=100_000)

    def use_node_interface(self) -> str | None:
        """The replica spans nodes: collectives go over the interface of Ray's node IP, unless the user
        named one (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, forwarded from the driver). Without it gloo
        hands its peers the address the hostname resolves to, often 127.0.0.1, and never connects."""
        name = interface_of(ray.util.get_node_ip_address())
        if name is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", name)
            os.environ.setdefault("NCCL_SOCKET_IFNAME", name)
        return name

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port free on it now (the TCP store binds it moments later)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def start(self, config: Any, init_method: str, registrations: dict[str, Any] | None = None) -> int:
        """Init distributed, load this rank's shard, profile: returns the KV blocks this rank can afford.

        `registrations`: the driver's out-of-tree `ModelRegistry` entries (this process has only the in-tree ones).
        """
        from pagedray.models.registry import ModelRegistry
        from pagedray.workers.worker import Worker
        ModelRegistry.register_all(registrations or {})
        local_device = "cuda:0" if config.device.device_type == "cuda" else "cpu"  # Ray masks to our GPU
        self.worker = Worker(config.model, config.cache, config.parallel, config.device,
                             config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs,
                             rank=self.rank, distributed_init_method=init_method, local_device=local_device,
                             kernel_options=config.kernel, speculative_config=config.speculative,
                             lora_config=getattr(config, "lora", None))
        self.worker.init_device()
        self.worker.load_model()
        return self.worker.num_kv_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)
        self.worker.capture_graphs()

    def execute_model(self, sched):
        t0 = time.perf_counter()
        out = self.worker.execute_model(sched)
        self.step_seconds.append(time.perf_counter() - t0)
        return out

    def add_lora(self, lora_request) -> bool:
        return self.worker.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.worker.remove_lora(lora_int_id)

    def ping(self) -> int:
        return os.getpid()

    def take_stage_times(self):
        """This rank's pipeline-stage times since the last call (workers/pipeline_stage.py), or None
        without pipeline parallelism."""
        io = self.worker.runner.stage_io if self.worker is not None else None
        return io.take_times() if io is not None else None

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def take_step_seconds(self) -> list[float]:
        out = list(self.step_seconds)
        self.step_seconds.clear()
        return out
