"""Ray clusters for tests on a host that other Ray users share.

Each cluster here runs in its own scope (deploy/local/scoped_ray.py): its processes carry
PAGEDRAY_RAY_SCOPE=<id> in their environment, its ports are picked free, its temp dir is its
own, and it is stopped by killing exactly those processes (Ray's `ray stop`, which
AutoscalingCluster calls, kills every Ray process on the host).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(LOOPBACK_ENV)   # before Ray is imported: it reads them at import time

from ray.cluster_utils import AutoscalingCluster  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
sys.path.insert(0, str(REPO / "deploy" / "local"))
import scoped_ray  # noqa: E402

_spec = importlib.util.spec_from_file_location("pagedray_local_node", REPO / "deploy" / "local" / "node.py")
local_node = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_node)
free_ports, head_port_args = local_node.free_ports, local_node.head_port_args

# The base config Ray's AutoscalingCluster loads from fake_multi_node/example.yaml, which the
# 2.60 wheel does not ship (node types are filled in by AutoscalingCluster).
FAKE_MULTINODE_BASE = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {},
    "head_node_type": "ray.head.default",
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "auth": {"ssh_user": "ubuntu"},
    "docker": {},
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
    "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


class ScopedAutoscalingCluster(AutoscalingCluster):
    """AutoscalingCluster with its own ports, temp dir and scope; shutdown() stops only it."""

    def __init__(self, head_resources: dict, worker_node_types: dict, **kwargs) -> None:
        self.scope = f"test-{uuid.uuid4().hex[:10]}"
        self.tmp = tempfile.mkdtemp(prefix="pras")   # short: Ray's socket paths live under it
        self.gcs_port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.gcs_port}"
        super().__init__(head_resources, worker_node_types, **kwargs)
        self._config["provider"]["gcs_address"] = self.address   # where fake nodes join

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        config = copy.deepcopy(FAKE_MULTINODE_BASE)
        config["available_node_types"] = dict(worker_node_types)
        config["available_node_types"]["ray.head.default"] = {
            "resources": head_resources, "node_config": {}, "max_workers": 0}
        if autoscaler_v2:
            from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
            config["provider"].update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
        config.update(config_kwargs)
        return config

    @property
    def config_file(self) -> str:
        """The autoscaling config the head's autoscaler reads (JSON, which is YAML)."""
        return str(Path(self.tmp) / "autoscaling.json")

    @property
    def env(self) -> dict[str, str]:
        """The environment this cluster's processes run with."""
        # tests/ on the workers' path: replicas may name test core factories (slow_core).
        pythonpath = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
        return {**os.environ, **LOOPBACK_ENV, scoped_ray.SCOPE_VAR: self.scope, "RAY_TMPDIR": self.tmp,
                "PYTHONPATH": pythonpath,
                "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1",
                "RAY_enable_autoscaler_v2": "1" if self._autoscaler_v2 else "0",
                **(self._v2_env() if self._autoscaler_v2 else {})}

    @staticmethod
    def _v2_env() -> dict[str, str]:
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
        return {"RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID}

    def start(self, _system_config=None, override_env=None) -> None:
        config_file = Path(self.config_file)
        config_file.write_text(json.dumps(self._config))
        resources = dict(self._head_resources)
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--autoscaling-config={config_file}", f"--temp-dir={self.tmp}/ray",
               f"--num-cpus={resources.pop('CPU', 0)}", f"--num-gpus={resources.pop('GPU', 0)}",
               *head_port_args(self.gcs_port), "--disable-usage-stats"]
        if resources:
            cmd.append(f"--resources={json.dumps(resources)}")
        if _system_config is not None:
            cmd.append(f"--system-config={json.dumps(_system_config, separators=(',', ':'))}")
        subprocess.run(cmd, env={**self.env, **(override_env or {})}, check=True, timeout=120,
                       stdout=subprocess.DEVNULL)

    def processes(self) -> list[int]:
        return scoped_ray.processes(self.scope)

    def shutdown(self) -> None:
        scoped_ray.stop(self.scope)
        shutil.rmtree(self.tmp, ignore_errors=True)


def start_local_ray(num_cpus: int) -> None:
    """A fresh Ray of our own (address="local", even if another cluster runs on this machine) whose
    workers can import the test helpers in tests/ (they inherit PYTHONPATH from the raylet)."""
    import ray
    old = os.environ.get("PYTHONPATH")
    if str(TESTS) not in (old or "").split(os.pathsep):
        os.environ["PYTHONPATH"] = str(TESTS) + (os.pathsep + old if old else "")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def wait_cpus_free(num_cpus: int, timeout: float = 20.0) -> None:
    """Every CPU of the local Ray is free again (AssertionError naming what is held after `timeout`)."""
    import ray
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU") != num_cpus:
        assert time.monotonic() < deadline, f"leaked: available {ray.available_resources()}"
        time.sleep(0.2)
