"""deploy/check_config.py on the repository's configs, and on broken copies of them: each broken
field fails with a message that names it (Ray's own validator accepts a typo'd node_config key)."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from testkit.ray_clusters import REPO

sys.path.insert(0, str(REPO / "deploy"))
import check_config  # noqa: E402

DEPLOY = REPO / "deploy"
KUBERAY = sorted((DEPLOY / "kuberay").glob("*.yaml"))


def _launcher(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def _kuberay() -> list[dict]:
    return [d for p in KUBERAY for d in yaml.safe_load_all(p.read_text()) if d]


def _doc(docs: list[dict], kind: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and "node-types.yaml" not in d.get("data", {}))


def test_the_repository_configs_pass():
    paths = [str(DEPLOY / "cluster-gpu.yaml"), str(DEPLOY / "local-cluster.yaml"), str(DEPLOY / "local-multinode.yaml"),
             *map(str, KUBERAY)]
    done = subprocess.run([sys.executable, str(DEPLOY / "check_config.py"), *paths], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert {d["kind"] for d in _kuberay()} == {"RayCluster", "RayJob", "Service", "ConfigMap"}


def test_gpu_nodes_scale_from_zero():
    assert _launcher("cluster-gpu.yaml")["available_node_types"]["gpu_4x"]["min_workers"] == 0
    cluster = _doc(_kuberay(), "RayCluster")
    assert [g["minReplicas"] for g in cluster["spec"]["workerGroupSpecs"]] == [0]


def test_ray_accepts_the_typo_our_check_names_it():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = _launcher("cluster-gpu.yaml")
    node_config = config["available_node_types"]["gpu_4x"]["node_config"]
    node_config["InstanceTyp"] = node_config.pop("InstanceType")
    validate_config(prepare_config(copy.deepcopy(config)))          # Ray lets it through
    with pytest.raises(ValueError, match=r"available_node_types\.gpu_4x\.node_config\.InstanceTyp: unknown "
                                         r"field \(did you mean 'InstanceType'\?\); not a field of EC2 RunInstances"):
        check_config.check_launcher(config, "cluster-gpu.yaml")


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["available_node_types"]["gpu_4x"].update(min_worker=0),
     r"Ray's launcher schema: .*'min_worker' was unexpected"),
    (lambda c: c.update(idle_timeout_minute=5), r"Ray's launcher schema"),
])
def test_unknown_node_type_or_top_level_field(edit, match):
    config = _launcher("cluster-gpu.yaml")
    edit(config)
    with pytest.raises(ValueError, match=match):
        check_config.check_launcher(config, "cluster-gpu.yaml")


@pytest.mark.parametrize("edit,match", [
    (lambda c: c["available_node_types"].update(extra={"resources": {}, "node_config": {"InstanceType": "x"},
                                                       "max_workers": 0}),
     r"available_node_types is not supported for on-premise"),
    (lambda c: c["head_start_ray_commands"].insert(0, "ray stop"), r"`ray stop` kills every Ray process"),
])
def test_local_cluster_rules(edit, match):
    config = _launcher("local-cluster.yaml")
    config.setdefault("available_node_types", {})
    edit(config)
    with pytest.raises(ValueError, match=match):
        check_config.check_launcher(config, "local-cluster.yaml")


def _rc(docs):
    return _doc(docs, "RayCluster")["spec"]


@pytest.mark.parametrize("edit,match", [
    (lambda d: _rc(d)["workerGroupSpecs"][0].update(maxReplica=4),
     r"workerGroupSpecs\[0\]\.maxReplica: unknown field \(did you mean 'maxReplicas'\?\)"),
    (lambda d: _rc(d).update(enableInTreeAutoscaling=False), r"spec\.enableInTreeAutoscaling: must be true"),
    (lambda d: _rc(d)["autoscalerOptions"].update(upscalingMode="Fast"), r"autoscalerOptions\.upscalingMode"),
    (lambda d: _rc(d)["headGroupSpec"]["rayStartParams"].update({"num-gpus": 0}),
     r"headGroupSpec\.rayStartParams\.num-gpus: must be a string"),
    (lambda d: _rc(d)["workerGroupSpecs"][0].update(minReplicas=5),
     r"workerGroupSpecs\[0\]: need integers 0 <= minReplicas <= replicas <= maxReplicas"),
    (lambda d: _rc(d)["workerGroupSpecs"][0].pop("groupName"), r"workerGroupSpecs\[0\]\.groupName: required"),
    (lambda d: _rc(d)["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
     r"containers\[0\]\.image: required"),
    (lambda d: _rc(d).pop("rayVersion"), r"spec\.rayVersion: required"),
    (lambda d: _doc(d, "RayJob")["spec"].update(clusterSelector={"ray.io/cluster": "other"}),
     r"clusterSelector: ray\.io/cluster 'other' names no RayCluster"),
    (lambda d: _doc(d, "RayJob")["spec"].update(submissionMode="Batch"), r"RayJob .*submissionMode"),
    (lambda d: _doc(d, "RayJob")["spec"].update(entrypoint="python serve.py --port 6000"),
     r"serves on port 6000, which the head container does not expose"),
    (lambda d: _doc(d, "Service")["spec"]["ports"][0].update(targetPort=5000),
     r"no Service selects RayCluster 'pagedray' with targetPort 50051"),
    (lambda d: _doc(d, "Service")["spec"]["selector"].update({"ray.io/node-type": "worker"}),
     r"ray\.io/node-type must be head"),
    (lambda d: _rc(d)["workerGroupSpecs"][0].update(maxReplicas=8),
     r"node-types\.yaml gpu-4x: .* but the worker group has \{'GPU': 4, 'max_workers': 8\}"),
])
def test_kuberay_field_checks(edit, match):
    docs = copy.deepcopy(_kuberay())
    edit(docs)
    with pytest.raises(ValueError, match=match):
        check_config.check_kuberay(docs)


def test_container_recipe_installs_the_cuda_extra_on_rays_image():
    lines = (DEPLOY / "kuberay" / "Dockerfile").read_text().splitlines()
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{_rc(_kuberay())['rayVersion']}-") and base.endswith("-gpu")
    assert any(line.startswith("RUN pip install") and "[cuda]" in line for line in lines)
