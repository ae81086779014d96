"""`ray stop` for one cluster on a host that runs others.

Ray's own `ray stop` (run by `ray down`, by `AutoscalingCluster`, and by head start commands
that begin with it) kills every Ray process on the host by name, so on a machine where other
clusters or test runs use Ray it takes theirs down too. Here a cluster is the set of processes
whose environment holds `PAGEDRAY_RAY_SCOPE=<id>`: the node's shell sets it before `ray start`,
and every Ray process (GCS, raylet, workers, the autoscaler, the nodes it launches, a driver
started from that shell, tmux) inherits it. `stop(scope)` ends exactly those.

As a command (`deploy/local/bin/ray`, first on PATH in the node's shell): `ray stop [--force]`
stops the scope of `$PAGEDRAY_RAY_SCOPE`; any other arguments go to Ray's own CLI.
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


def processes(scope: str) -> list[int]:
    """PIDs of the processes in `scope`, except this process and its ancestors."""
    if not scope:
        raise ValueError(f"{SCOPE_VAR} is empty: no cluster to stop")
    entry = f"{SCOPE_VAR}={scope}".encode()
    skip = _ancestors(os.getpid())
    return [pid for pid in (int(d) for d in os.listdir("/proc") if d.isdigit())
            if pid not in skip and _environ_has(pid, entry)]


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


def main(argv: list[str]) -> int:
    if argv[:1] == ["stop"]:
        scope = os.environ.get(SCOPE_VAR, "")
        if not scope:
            print(f"ray stop: {SCOPE_VAR} is not set; refusing to stop every Ray process on this host",
                  file=sys.stderr)
            return 1
        pids = stop(scope, grace_s=0 if "--force" in argv or "-f" in argv else 3.0)
        print(f"Stopped {len(pids)} process(es) of Ray scope {scope}.")
        return 0
    from ray.scripts.scripts import main as ray_main
    sys.argv = ["ray", *argv]
    return ray_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
