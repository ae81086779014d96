"""A watchdog that takes down the local Ray a process started, when that process dies, even by SIGKILL.

What Ray does by itself (Ray 2.60, Linux): `ray.init()` starting a local cluster fate-shares the
processes it starts (gcs_server, raylet, monitor, dashboard head, log monitor) with the driver
(PR_SET_PDEATHSIG). The raylet's own children, DashboardAgent and RuntimeEnvAgent (~90 MB each),
notice the raylet's death within a second or two, then try to report it to the GCS, which is dead
too, and hang there (gcs_client.publish_error with a 60 s timeout, and longer). Workers exit
with the raylet.

So `init_ray` starts this watchdog in a session of its own, holding the read end of a pipe
whose write end only the driver holds: EOF means the driver is gone. It then gives Ray's own
fate-sharing a moment and SIGKILLs every process that Ray started for this driver and that
still runs: the ones recorded at start-up (pid and start time, so a reused pid is never hit),
and every later process whose environment names this cluster's raylet (RAY_RAYLET_PID).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of `pid`, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[19])


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for pid in _pids():
        st = _stat(pid)
        if st is not None:
            children.setdefault(st[0], []).append(pid)
            starts[pid] = st[1]
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _names_raylet(pid: int, raylet_pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"RAY_RAYLET_PID={raylet_pid}".encode() in f.read().split(b"\0")
    except OSError:
        return False


def watch(ray_pids: dict[int, int]) -> subprocess.Popen | None:
    """Start the watchdog for `ray_pids` ({pid: start time}, from `descendants`); Linux only."""
    if not sys.platform.startswith("linux") or not ray_pids:
        return None
    raylets = [pid for pid in ray_pids if _comm(pid) == "raylet"]
    args = [sys.executable, "-m", "pagedray.cluster.executors.ray_watchdog",
            str(raylets[0] if raylets else 0)] + [f"{pid}:{start}" for pid, start in ray_pids.items()]
    # Its own session: a Ctrl-C or a kill of the driver's process group leaves it to do its job.
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)


def _reap(raylet_pid: int, recorded: dict[int, int], grace_s: float = 1.0) -> list[int]:
    time.sleep(grace_s)
    raylet_start = recorded.get(raylet_pid, 0)
    targets = {pid for pid, start in recorded.items() if (_stat(pid) or (0, -1))[1] == start}
    if raylet_pid:
        for pid in _pids():
            st = _stat(pid)
            if st is not None and st[1] >= raylet_start and pid != os.getpid() and _names_raylet(pid, raylet_pid):
                targets.add(pid)
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(targets)


def main(argv: list[str]) -> None:
    raylet_pid = int(argv[0])
    recorded = {int(p): int(s) for p, s in (item.split(":") for item in argv[1:])}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdin.buffer.read()        # returns at EOF: the driver exited, however it exited
    _reap(raylet_pid, recorded)


if __name__ == "__main__":
    main(sys.argv[1:])
