"""The Ray executor on a simulated two-node cluster (`ray.cluster_utils.Cluster`).

The head has 1 CPU and the second node 2: the cluster holds 3 CPUs in all, but a
replica's ranks must share one node. A third node declares 2 GPUs that do not exist,
which is enough to check how GPU ranks are placed. The driver joins the running
cluster through RAY_ADDRESS, as `ray submit` would, rather than starting its own Ray.
"""
from __future__ import annotations

import os
import random
import time

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from testkit.hf_compare import assert_greedy_match, engine_greedy  # noqa: E402
from testkit.tiny_models import make_tiny_llama  # noqa: E402

from pagedray.cluster import LLM, SamplingParams  # noqa: E402
from pagedray.cluster.config import build_engine_config  # noqa: E402
from pagedray.cluster.executors import ExecutorError  # noqa: E402
from pagedray.cluster.executors.ray import RayExecutor  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker_node = cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=0, num_gpus=2)
    cluster.wait_for_nodes()
    os.environ["RAY_ADDRESS"] = cluster.address
    yield cluster, worker_node.node_id
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    cluster.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


def test_tp_larger_than_any_node_is_a_value_error(cluster, checkpoint):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 cannot fit.*largest node .* has 2 CPU"):
        LLM(checkpoint, device="cpu", executor="ray", tensor_parallel_size=3)
    assert ray.available_resources().get("CPU") == 3   # nothing was reserved


def test_gpu_ranks_fit_gpu_bundles(cluster, checkpoint):
    """GPU ranks go into {"GPU": 1} bundles (they must not also ask for a CPU the bundle lacks): here
    they get as far as starting on the node's fake GPUs, which this CPU-only torch cannot open."""
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 cannot fit.*largest node .* has 2 GPU"):
        RayExecutor(build_engine_config(checkpoint, device="cuda", executor="ray", tensor_parallel_size=3))
    # (the CPU build of torch says CUDA is not compiled in; PyPI's CUDA build, on a machine without a GPU,
    # that it found no NVIDIA driver)
    with pytest.raises(ExecutorError, match=r"(?i)during loading the model: .*(cuda|nvidia driver)"):
        RayExecutor(build_engine_config(checkpoint, device="cuda", executor="ray", tensor_parallel_size=2))
    _wait_all_free()


def test_replica_packs_onto_the_node_that_fits(cluster, checkpoint):
    _, worker_node_id = cluster
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 320) for _ in range(n)]} for n in (7, 19, 30)]
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2)
    want = [engine_greedy(o.outputs[0]) for o in LLM(checkpoint, device="cpu").generate(prompts, params, use_tqdm=False)]
    llm = LLM(checkpoint, device="cpu", executor="ray", tensor_parallel_size=2)
    try:
        # The driver joined the running cluster instead of starting its own Ray.
        assert ray.get_runtime_context().gcs_address == cluster[0].address
        nodes = ray.get([w.node_id.remote() for w in llm.llm_engine.executor.workers])
        assert nodes == [worker_node_id, worker_node_id]
        got = [engine_greedy(o.outputs[0]) for o in llm.generate(prompts, params, use_tqdm=False)]
        for i, (ours, ref) in enumerate(zip(got, want, strict=True)):
            assert_greedy_match(ours, ref, atol=1e-5, what=f"prompt {i}: TP=2 vs TP=1")
    finally:
        llm.shutdown()
    _wait_all_free()


def _wait_all_free(timeout: float = 15.0) -> None:
    """shutdown() returns once the kills and the removal are sent; Ray frees the bundles moments later."""
    deadline = time.monotonic() + timeout
    while (ray.available_resources().get("CPU"), ray.available_resources().get("GPU")) != (3, 2):
        assert time.monotonic() < deadline, f"bundles still held: {ray.available_resources()}"
        time.sleep(0.2)
