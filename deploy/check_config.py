"""Checks of the deploy configs that are stricter than Ray's.

Ray's launcher validator passes `node_config` through untouched (it goes to the cloud's API at
launch), so a typo such as `InstanceTyp` surfaces only when a node fails to start. Here:
- launcher YAMLs: Ray's own schema (it names unknown top-level and node-type fields), then each
  `node_config` against the provider's API (AWS: EC2 RunInstances, from botocore's service model);
  a local cluster must not `ray stop` (it would kill other clusters on the host);
- KubeRay manifests: the RayCluster / RayJob / Service fields KubeRay reads (no package on the
  registries carries KubeRay's CRD schema, so the fields are listed here), and that they agree.
Every error is a ValueError naming the file and the field.

    python deploy/check_config.py deploy/*.yaml deploy/kuberay/*.yaml
"""
from __future__ import annotations

import copy
import difflib
import os
import shlex
import sys
from pathlib import Path

import yaml


def _unknown(where: str, keys, allowed, what: str) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}.{key}: unknown field{hint}; {what}")


# -- cluster launcher ---------------------------------------------------------------------------
def _node_config_fields(provider: str) -> set[str] | None:
    """The keys a node_config may hold for `provider`; None when there is no schema for it here."""
    if provider == "aws":
        import botocore.session   # what Ray's AWS provider passes node_config to
        model = botocore.session.get_session().get_service_model("ec2")
        return set(model.operation_model("RunInstances").input_shape.members)
    return None


def check_launcher(config: dict, name: str = "config") -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config
    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as exc:   # Ray raises jsonschema / ValueError with its own wording
        raise ValueError(f"{name}: Ray's launcher schema: {str(exc).splitlines()[0]}") from exc
    provider = config["provider"]["type"]
    node_fields = _node_config_fields(provider)
    for type_name, node_type in config.get("available_node_types", {}).items():
        if node_fields is not None:
            _unknown(f"{name}: available_node_types.{type_name}.node_config", node_type.get("node_config") or {},
                     node_fields, "not a field of EC2 RunInstances")
    if provider == "local":
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            for command in config.get(key) or []:
                if shlex.split(command)[:2] == ["ray", "stop"]:
                    raise ValueError(f"{name}: {key}: `ray stop` kills every Ray process on the host, other "
                                     f"clusters' too; deploy/local/scoped_ray.py stops this one at `ray down`")


# -- KubeRay --------------------------------------------------------------------------------------
# Fields of KubeRay's ray.io/v1 types (ray-operator/apis/ray/v1: raycluster_types.go, rayjob_types.go).
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                   "workerGroupSpecs", "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
AUTOSCALER_OPTIONS = {"upscalingMode", "idleTimeoutSeconds", "resources", "image", "imagePullPolicy", "env",
                      "envFrom", "securityContext", "volumeMounts", "version"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                "scaleStrategy", "idleTimeoutSeconds", "suspend", "numOfHosts"}
RAYJOB_SPEC = {"entrypoint", "rayClusterSpec", "clusterSelector", "submissionMode", "shutdownAfterJobFinishes",
               "ttlSecondsAfterFinished", "runtimeEnvYAML", "jobId", "metadata", "entrypointNumCpus",
               "entrypointNumGpus", "entrypointResources", "activeDeadlineSeconds", "backoffLimit",
               "submitterPodTemplate", "submitterConfig", "suspend", "managedBy", "deletionStrategy"}
UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def _containers(where: str, group: dict) -> list[dict]:
    containers = (group.get("template") or {}).get("spec", {}).get("containers") or []
    if not containers:
        raise ValueError(f"{where}.template.spec.containers: a group needs at least one container")
    for i, c in enumerate(containers):
        for key in ("name", "image"):
            if not c.get(key):
                raise ValueError(f"{where}.template.spec.containers[{i}].{key}: required")
    return containers


def _start_params(where: str, group: dict) -> None:
    params = group.get("rayStartParams")
    if not isinstance(params, dict):
        raise ValueError(f"{where}.rayStartParams: required (a map, may be empty)")
    for key, value in params.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}.rayStartParams.{key}: must be a string (map[string]string), got {value!r}")


def check_raycluster(doc: dict, name: str) -> None:
    spec = doc.get("spec") or {}
    _unknown(f"{name}: spec", spec, RAYCLUSTER_SPEC, "see KubeRay's RayClusterSpec")
    if not isinstance(spec.get("rayVersion"), str):
        raise ValueError(f"{name}: spec.rayVersion: required, a string")
    if spec.get("enableInTreeAutoscaling") is not True:
        raise ValueError(f"{name}: spec.enableInTreeAutoscaling: must be true (the GPU group scales from 0)")
    options = spec.get("autoscalerOptions") or {}
    _unknown(f"{name}: spec.autoscalerOptions", options, AUTOSCALER_OPTIONS, "see KubeRay's AutoscalerOptions")
    if options.get("upscalingMode", "Default") not in UPSCALING_MODES:
        raise ValueError(f"{name}: spec.autoscalerOptions.upscalingMode: one of {sorted(UPSCALING_MODES)}")
    if not isinstance(options.get("idleTimeoutSeconds", 60), int) or options.get("idleTimeoutSeconds", 60) < 0:
        raise ValueError(f"{name}: spec.autoscalerOptions.idleTimeoutSeconds: an integer >= 0")
    head = spec.get("headGroupSpec") or {}
    _unknown(f"{name}: spec.headGroupSpec", head, HEAD_GROUP, "see KubeRay's HeadGroupSpec")
    _start_params(f"{name}: spec.headGroupSpec", head)
    _containers(f"{name}: spec.headGroupSpec", head)
    groups = spec.get("workerGroupSpecs") or []
    seen = set()
    for i, group in enumerate(groups):
        where = f"{name}: spec.workerGroupSpecs[{i}]"
        _unknown(where, group, WORKER_GROUP, "see KubeRay's WorkerGroupSpec")
        if not group.get("groupName") or group["groupName"] in seen:
            raise ValueError(f"{where}.groupName: required and unique")
        seen.add(group["groupName"])
        low, now, high = (group.get(k) for k in ("minReplicas", "replicas", "maxReplicas"))
        if not all(isinstance(v, int) for v in (low, now, high)) or not 0 <= low <= now <= high:
            raise ValueError(f"{where}: need integers 0 <= minReplicas <= replicas <= maxReplicas, got "
                             f"{low}, {now}, {high}")
        _start_params(where, group)
        _containers(where, group)


def _worker_gpus(group: dict) -> int:
    return sum(int((c.get("resources") or {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in group["template"]["spec"]["containers"])


def _entrypoint_port(entrypoint: str) -> int:
    args = shlex.split(entrypoint)
    return int(args[args.index("--port") + 1]) if "--port" in args else 50051


def check_kuberay(docs: list[dict], name: str = "manifests") -> None:
    """Each manifest on its own, then that they fit together: the RayJob runs on the RayCluster, the
    Service reaches the port the job serves on, and the node-types ConfigMap matches the worker groups."""
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind"), []).append(doc)
    clusters = {d["metadata"]["name"]: d for d in by_kind.get("RayCluster", [])}
    for cluster_name, doc in clusters.items():
        if doc.get("apiVersion") != "ray.io/v1":
            raise ValueError(f"{name}: RayCluster {cluster_name}: apiVersion must be ray.io/v1")
        check_raycluster(doc, f"{name}: RayCluster {cluster_name}")
    for job in by_kind.get("RayJob", []):
        where = f"{name}: RayJob {job['metadata']['name']}: spec"
        spec = job.get("spec") or {}
        _unknown(where, spec, RAYJOB_SPEC, "see KubeRay's RayJobSpec")
        if not spec.get("entrypoint"):
            raise ValueError(f"{where}.entrypoint: required")
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            raise ValueError(f"{where}.submissionMode: one of {sorted(SUBMISSION_MODES)}")
        target = (spec.get("clusterSelector") or {}).get("ray.io/cluster")
        if "rayClusterSpec" not in spec and target not in clusters:
            raise ValueError(f"{where}.clusterSelector: ray.io/cluster {target!r} names no RayCluster here "
                             f"({sorted(clusters)})")
        port = _entrypoint_port(spec["entrypoint"])
        head = clusters[target]["spec"]["headGroupSpec"] if target in clusters else spec["rayClusterSpec"]["headGroupSpec"]
        exposed = {p.get("containerPort") for c in _containers(where, head) for p in c.get("ports", [])}
        if port not in exposed:
            raise ValueError(f"{where}.entrypoint: serves on port {port}, which the head container does not "
                             f"expose ({sorted(exposed)})")
        services = [s for s in by_kind.get("Service", []) if (s["spec"].get("selector") or {}).get("ray.io/cluster") == target]
        if not any(p.get("targetPort") == port for s in services for p in s["spec"].get("ports", [])):
            raise ValueError(f"{where}: no Service selects RayCluster {target!r} with targetPort {port}")
        for s in services:
            if s["spec"]["selector"].get("ray.io/node-type") != "head":
                raise ValueError(f"{name}: Service {s['metadata']['name']}: spec.selector ray.io/node-type must be "
                                 f"head (the server runs on the head pod)")
    for config_map in by_kind.get("ConfigMap", []):
        if "node-types.yaml" in (config_map.get("data") or {}):
            _check_node_types(yaml.safe_load(config_map["data"]["node-types.yaml"]), clusters, name)


def _check_node_types(node_types: dict, clusters: dict, name: str) -> None:
    groups = {g["groupName"]: g for c in clusters.values() for g in c["spec"].get("workerGroupSpecs", [])}
    types = node_types.get("available_node_types") or {}
    if set(types) != set(groups):
        raise ValueError(f"{name}: node-types.yaml lists {sorted(types)}, the worker groups are {sorted(groups)}")
    for group_name, t in types.items():
        want = {"GPU": _worker_gpus(groups[group_name]), "max_workers": groups[group_name]["maxReplicas"]}
        have = {"GPU": t["resources"].get("GPU", 0), "max_workers": t.get("max_workers")}
        if have != want:
            raise ValueError(f"{name}: node-types.yaml {group_name}: {have} but the worker group has {want}")


def check_file(path: str | os.PathLike) -> None:
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    if any("apiVersion" in d for d in docs):
        check_kuberay(docs, str(path))
    else:
        for doc in docs:
            check_launcher(doc, str(path))


def main(paths: list[str]) -> int:
    kube = [d for p in paths if "kuberay" in Path(p).parts
            for d in yaml.safe_load_all(Path(p).read_text()) if d]
    try:
        if kube:
            check_kuberay(kube, "deploy/kuberay")
        for p in paths:
            if "kuberay" not in Path(p).parts and p.endswith((".yaml", ".yml")):
                check_file(p)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {len(paths)} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
