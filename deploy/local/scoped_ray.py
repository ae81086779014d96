"""`ray stop` for one cluster on a host that runs others.

Ray's own `ray stop` (run by `ray down`, by `AutoscalingCluster`, and by head start commands
that begin with it) kills every Ray process on the host by name, so on a machine where other
clusters or test runs use Ray it takes theirs down too. Here a cluster is the set of processes
whose environment holds `PAGEDRAY_RAY_SCOPE=<id>`: the node's shell sets it before `ray start`,
and every Ray process (GCS, raylet, workers, the autoscaler, the nodes it launches, a driver
started from that shell, tmux) inherits it. `stop(scope)` ends exactly those.

As a command (`deploy/local/bin/ray`, first on PATH in the node's shell): `ray stop [--force]`
stops the scope of `$PAGEDRAY_RAY_SCOPE`; any other arguments go to Ray's own CLI.

On the head of a multi-machine local-provider cluster (deploy/local-multinode.yaml), `ray stop`
first runs `ray stop` on each worker the launcher config lists: `ray down` runs `ray stop` on the
head only and Ray's local provider merely forgets the workers, whose raylets and agents would
otherwise outlive the cluster.
"""
from __future__ import annotations

import os
import signal
import sys
import time

SCOPE_VAR = "PAGEDRAY_RAY_SCOPE"


def _environ_has(pid: int, entry: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return entry in f.read().split(b"\0")
    except OSError:   # gone, or not ours to read
        return False


def _ancestors(pid: int) -> set[int]:
    """`pid` and its parents: the shell that runs `ray stop` carries the scope too."""
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/status") as f:
                pid = next(int(line.split()[1]) for line in f if line.startswith("PPid:"))
        except (OSError, StopIteration):
            break
    return seen


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process now."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):   # gone meanwhile
                pass
    return parents


def processes(scope: str) -> list[int]:
    """PIDs of the processes in `scope` and their descendants, except this process and its ancestors.
    Descendants: `ray::DashboardAgent` and `RuntimeEnvAgent` (children of the raylet) blank their
    /proc/PID/environ when they rename themselves, so the scope cannot be read from them."""
    if not scope:
        raise ValueError(f"{SCOPE_VAR} is empty: no cluster to stop")
    entry = f"{SCOPE_VAR}={scope}".encode()
    skip = _ancestors(os.getpid())
    parents = _parents()
    scoped = {pid for pid in parents if pid not in skip and _environ_has(pid, entry)}
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    todo = list(scoped)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in scoped and child not in skip:
                scoped.add(child)
                todo.append(child)
    return sorted(scoped)


def stop(scope: str, grace_s: float = 3.0) -> list[int]:
    """SIGTERM every process of `scope`, SIGKILL what is left after `grace_s` (and whatever a dying
    raylet spawned meanwhile) until none is left; returns the PIDs signalled."""
    pids = processes(scope)
    _signal(pids, signal.SIGTERM if grace_s > 0 else signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and processes(scope):
        time.sleep(0.2)
    deadline = time.monotonic() + 10.0
    while (left := processes(scope)) and time.monotonic() < deadline:
        _signal(left, signal.SIGKILL)
        pids += [p for p in left if p not in pids]
        time.sleep(0.1)
    return pids


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"   # where `ray up` leaves the launcher config on the head
BOOTSTRAP_KEY = "~/ray_bootstrap_key.pem"


def stop_workers(argv: list[str], timeout_s: float = 60.0) -> None:
    """On a local-provider head: `ray stop` on every listed worker, over the launcher's SSH key."""
    import subprocess
    path = os.path.expanduser(BOOTSTRAP_CONFIG)
    if not os.path.exists(path):
        return
    import yaml
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    provider = config.get("provider") or {}
    if provider.get("type") != "local" or not provider.get("worker_ips"):
        return
    user = (config.get("auth") or {}).get("ssh_user", "root")
    key = os.path.expanduser(BOOTSTRAP_KEY)
    ssh = ["ssh", "-i", key, "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR"]
    remote = "bash --login -c 'source ~/.bashrc; " + " ".join(["ray", *argv]) + "'"
    calls = [subprocess.Popen([*ssh, f"{user}@{ip}", remote]) for ip in provider["worker_ips"]]
    for call in calls:
        try:
            call.wait(timeout_s)
        except subprocess.TimeoutExpired:
            call.kill()


def main(argv: list[str]) -> int:
    if argv[:1] == ["stop"]:
        scope = os.environ.get(SCOPE_VAR, "")
        if not scope:
            print(f"ray stop: {SCOPE_VAR} is not set; refusing to stop every Ray process on this host",
                  file=sys.stderr)
            return 1
        stop_workers(argv)
        pids = stop(scope, grace_s=0 if "--force" in argv or "-f" in argv else 3.0)
        print(f"Stopped {len(pids)} process(es) of Ray scope {scope}.")
        return 0
    from ray.scripts.scripts import main as ray_main
    sys.argv = ["ray", *argv]
    return ray_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
