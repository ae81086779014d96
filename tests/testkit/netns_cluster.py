"""A real multi-node Ray cluster on this machine: one network namespace per Ray node.

Layout (built in ~0.1 s): a namespace holding only a bridge (no address, no uplink: nothing leaves
it), and per Ray node a namespace with a veth named `eth0` on that bridge, an address from the
documentation range 198.51.100.0/24, `lo` up and a default route through `eth0` (Ray's node-IP
guess then finds that address). Node 0 is the head (0 CPUs: only the driver runs there, as on a
real cluster); the others are workers with CPUs and a fake GPU resource. Each node is a plain
`ray start` with its own temp dir and non-default ports.

The driver (a test scenario, `pagedray serve`) runs in the head's namespace (`run`/`popen`), and
talks to its own 127.0.0.1 there. `kill_node` SIGKILLs every process of one namespace (a machine
that lost power); `shutdown` does that for all of them and deletes the namespaces. Never
`ray stop`: the namespaces share this host's process table, so it would kill every Ray here.

Facts this relies on: ../shared/RAY-NOTES.md ("one network namespace per node").
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUBNET = "198.51.100"
GCS_PORT = 6390          # in each namespace: non-default, so a stray default client never reaches it
# Ray declares a silent node dead in ~1.5 s instead of ~15 s (what deploy/*.yaml set too).
FAST_HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                     "health_check_failure_threshold": 3}
# Ray's default per-node ports, moved (the GCS above; each namespace has its own port space, so
# these cannot collide with another cluster's, but nothing here depends on Ray's defaults either).
NODE_PORTS = ["--node-manager-port=6391", "--object-manager-port=6392", "--metrics-export-port=6393",
              "--runtime-env-agent-port=6394", "--dashboard-agent-grpc-port=6395",
              "--dashboard-agent-listen-port=6396", "--min-worker-port=20000", "--max-worker-port=20999"]
LEAN = ["--include-log-monitor=false", "--object-store-memory=100000000", "--disable-usage-stats"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why a namespace cluster cannot be built here (a skip reason), or None."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        return "Ray's CLI is not installed next to this Python"
    probe = f"prprobe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here: {made.stderr.strip() or made.returncode}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Node:
    name: str            # the namespace
    ip: str
    cpus: int
    resources: dict[str, float] = field(default_factory=dict)


class Namespaces:
    """The network: a bridge namespace and one namespace per node, `nodes[i]` at 198.51.100.(first + i)."""

    def __init__(self, nodes: list[tuple[int, dict[str, float]]], first: int = 10) -> None:
        self.prefix = f"pr{uuid.uuid4().hex[:6]}"
        self.bridge = f"{self.prefix}br"
        self.nodes = [Node(f"{self.prefix}n{i}", f"{SUBNET}.{first + i}", cpus, dict(res))
                      for i, (cpus, res) in enumerate(nodes)]
        self.tmp = Path(tempfile.mkdtemp(prefix="prns"))   # short: Ray's socket paths live under it
        self._made: list[str] = []

    # -- the network ------------------------------------------------------------------------------
    def _build_network(self) -> None:
        _ip("netns", "add", self.bridge)
        self._made.append(self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for i, node in enumerate(self.nodes):
            _ip("netns", "add", node.name)
            self._made.append(node.name)
            _ip("-n", self.bridge, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", node.name)
            _ip("-n", self.bridge, "link", "set", f"v{i}", "master", "br0", "up")
            _ip("-n", node.name, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            _ip("-n", node.name, "link", "set", "eth0", "up")
            _ip("-n", node.name, "link", "set", "lo", "up")
            _ip("-n", node.name, "route", "add", "default", "dev", "eth0")

    # -- processes --------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process in the namespaces: multi-node Ray (the loopback-only
        switch that tests elsewhere set would make `ray start --address` refuse), no stray address,
        and tests/ importable (scenarios and test core factories)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "GLOO_SOCKET_IFNAME",
                            "NCCL_SOCKET_IFNAME")}
        pythonpath = [str(REPO / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONPATH=os.pathsep.join(pythonpath),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        env.update(extra)
        return env

    def _exec(self, node: Node, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", node.name, *argv]

    def run(self, node: Node, argv: list[str], timeout: float, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(self._exec(node, argv), env=self.env(**extra_env), capture_output=True,
                              text=True, timeout=timeout)

    def popen(self, node: Node, argv: list[str], **kwargs) -> subprocess.Popen:
        env = self.env(**kwargs.pop("extra_env", {}))
        return subprocess.Popen(self._exec(node, argv), env=env, **kwargs)

    # -- failure and teardown ---------------------------------------------------------------------
    def pids(self, node: Node) -> list[int]:
        out = _ip("netns", "pids", node.name, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, node: Node) -> None:
        """SIGKILL every process in the node's namespace (its address stays, so peers get refusals)."""
        for _ in range(5):   # a process may fork while we kill
            pids = self.pids(node)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    def shutdown(self) -> None:
        for node in self.nodes:
            if node.name in self._made:
                self.kill_node(node)
        for name in reversed(self._made):
            _ip("netns", "del", name, check=False)
        self._made = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def start(self):
        try:
            self._build_network()
        except BaseException:
            self.shutdown()
            raise
        return self


class NetnsCluster(Namespaces):
    """`workers`: per worker node, (CPUs, custom resources), e.g. [(2, {"fake_gpu": 2})] * 3; node 0 is
    a head of 0 CPUs."""

    def __init__(self, workers: list[tuple[int, dict[str, float]]],
                 system_config: dict | None = None) -> None:
        super().__init__([(0, {})] + list(workers))
        self.system_config = FAST_HEALTH_CHECK if system_config is None else system_config

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    def _ray(self) -> str:
        return str(Path(sys.executable).parent / "ray")

    def run_python(self, argv: list[str], timeout: float, **extra_env: str) -> dict:
        """A driver script in the head's namespace (connected to this cluster); its last stdout line is
        JSON, returned. AssertionError with its output when it fails."""
        done = self.run(self.head, [sys.executable, *argv], timeout, RAY_ADDRESS=self.address, **extra_env)
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            raise AssertionError(f"{argv} exited {done.returncode}\nstdout:\n{done.stdout[-4000:]}\n"
                                 f"stderr:\n{done.stderr[-8000:]}")
        return json.loads(lines[-1])

    def _start_node(self, node: Node, head: bool) -> subprocess.CompletedProcess:
        args = [self._ray(), "start", f"--node-ip-address={node.ip}", f"--num-cpus={node.cpus}",
                f"--temp-dir={self.tmp / node.name}", *NODE_PORTS, *LEAN]
        if node.resources:
            args.append(f"--resources={json.dumps(node.resources)}")
        if head:
            args += ["--head", f"--port={GCS_PORT}", "--include-dashboard=false",
                     f"--ray-client-server-port={GCS_PORT + 10}",
                     f"--system-config={json.dumps(self.system_config, separators=(',', ':'))}"]
        else:
            args.append(f"--address={self.address}")
        return subprocess.run(self._exec(node, args), env=self.env(), capture_output=True, text=True, timeout=180)

    def start(self) -> "NetnsCluster":
        super().start()
        try:
            done = self._start_node(self.head, head=True)
            if done.returncode != 0:
                raise RuntimeError(f"ray start --head failed:\n{done.stdout}\n{done.stderr}")
            # Workers one after another: concurrent joins on 2 busy cores time out more than they save.
            for node in self.workers:
                done = self._start_node(node, head=False)
                if done.returncode != 0:
                    raise RuntimeError(f"ray start on {node.name} failed:\n{done.stdout}\n{done.stderr}")
            self.wait_nodes(len(self.nodes))
        except BaseException:
            self.shutdown()
            raise
        return self

    def wait_nodes(self, alive: int, timeout: float = 60.0) -> None:
        """Until the GCS counts exactly `alive` live nodes."""
        script = ("import ray,json; ray.init(log_to_driver=False); "
                  "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))")
        deadline = time.monotonic() + timeout
        while True:
            count = self.run_python(["-c", script], 60)
            if count == alive:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} live Ray nodes after {timeout:g} s, expected {alive}")
            time.sleep(1.0)

