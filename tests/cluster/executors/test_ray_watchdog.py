"""A local Ray started by `init_ray` goes away with its driver, even when the driver is SIGKILLed.

Without the watchdog, Ray 2.60's DashboardAgent and RuntimeEnvAgent outlive a SIGKILLed driver
(they hang reporting the raylet's death to the dead GCS) for a minute or more.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from testkit.client_checks import wait_gone

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    sys.path[:0] = {path!r}
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    from pagedray.cluster.executors.ray_utils import start_local_ray
    from pagedray.cluster.executors.ray_watchdog import descendants
    start_local_ray(1)
    import ray
    ray.get(ray.remote(lambda: 1).remote())      # a worker too
    names = {{}}
    for pid in descendants(os.getpid()):
        with open(f"/proc/{{pid}}/cmdline", "rb") as f:
            names[pid] = f.read().split(b"\\0")[0].decode(errors="replace")
    print(json.dumps(names), flush=True)
    time.sleep(600)
""")


def test_local_ray_dies_with_a_sigkilled_driver(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(SCRIPT.format(path=sys.path))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    names: dict[int, str] = {}
    try:
        names = {int(pid): name for pid, name in json.loads(driver.stdout.readline()).items()}
        assert any("DashboardAgent" in n for n in names.values()), names
        assert any("RuntimeEnvAgent" in n for n in names.values()), names
        assert any("raylet" in n for n in names.values()), names
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        left = {pid: name for pid, name in names.items() if not wait_gone(pid, 15)}
        assert not left, f"outlived the SIGKILLed driver: {left}"
    finally:
        driver.kill()
        for pid in names:      # whatever a failure left behind
            if not wait_gone(pid, 0):
                os.kill(pid, signal.SIGKILL)


def test_sigkilled_server_takes_its_own_ray_and_engine_actors_along(tmp_path, monkeypatch):
    """`pagedray serve --replica-backend ray` that starts a Ray of its own (RAY_ADDRESS=local: this
    box may run others' clusters, which address="auto" would join): a SIGKILL of the server leaves
    none of it (agents, raylet, GCS, the engine core's actor) running."""
    import tempfile

    from testkit.serve_process import ServeProcess
    from testkit.tiny_models import make_tiny_llama

    from pagedray.cluster.executors.ray_watchdog import descendants
    ckpt = make_tiny_llama(tmp_path / "ckpt")
    # A Ray temp dir of its own (short: Ray's socket paths must fit 107 bytes): nothing to join.
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="r", dir="/tmp"))
    monkeypatch.setenv("RAY_ADDRESS", "local")
    for name, value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_AUTH_MODE", "disabled"),
                        ("RAY_USAGE_STATS_ENABLED", "0")):
        monkeypatch.setenv(name, value)
    server = ServeProcess(["--model", ckpt, "--port", "0", "--device", "cpu", "--block-size", "4",
                           "--num-kv-blocks", "256", "--replica-backend", "ray", "--replicas", "1"])
    left: dict[int, str] = {}
    try:
        server.wait_for(r"ready: serving model", timeout=180)
        names = {pid: _cmd(pid) for pid in descendants(server.proc.pid)}
        assert any("raylet" in n for n in names.values()) and any("CoreActor" in n for n in names.values()), names
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        left = {pid: name for pid, name in names.items() if not wait_gone(pid, 15)}
        assert not left, f"outlived the SIGKILLed server: {left}"
    finally:
        server.proc.kill()
        for pid in left:
            os.kill(pid, signal.SIGKILL)


def _cmd(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""
