"""The Ray executor on CPU: TP=2 over gloo against TP=1 and HF transformers; worker death.

One local Ray instance (4 CPUs) serves the whole module; each executor takes 2 of them.
"""
from __future__ import annotations

import os
import random
import signal
import time

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import ray  # noqa: E402

from hf_reference import hf_greedy  # noqa: E402
from tiny_models import load_hf_model, make_tiny_llama  # noqa: E402

from pagedray.cluster import LLM, SamplingParams  # noqa: E402
from pagedray.cluster.engine import EngineDeadError  # noqa: E402

NUM_CPUS = 4

# Architectures of the registry, each with a KV layout that shards differently over 2 ranks.
ARCHS = {
    # 2 KV heads: one per rank.
    "llama": dict(arch="llama", num_key_value_heads=2),
    # 1 KV head: replicated on both ranks; tied embeddings; sliding window.
    "mistral": dict(arch="mistral", num_key_value_heads=1, tie_word_embeddings=True, sliding_window=8),
}


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: make_tiny_llama(tmp_path_factory.mktemp(name), **cfg) for name, cfg in ARCHS.items()}


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 320) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


# Small blocks, a small cache and a small token budget: chunked prefill and preemption both happen,
# so running requests travel as deltas and preempted ones come back whole.
ENGINE_KW = dict(device="cpu", block_size=4, num_kv_blocks=24, max_num_batched_tokens=16)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, logprobs=0)


def _generate(llm: LLM, prompts: list[list[int]]):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)])
            for o in outs]


def _assert_same(got, want, abs: float) -> None:
    """Same greedy tokens, and the chosen tokens' logprobs within `abs`."""
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(got, want, strict=True):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=abs)


def _alive_worker_actors() -> list[str]:
    from ray._private.state import actors   # the GCS table; the public state API needs the dashboard
    return [a["ActorID"] for a in actors().values()
            if a["ActorClassName"] == "WorkerActor" and a["State"] != "DEAD"]


def _assert_released() -> None:
    """No WorkerActor left, no placement group held, every CPU free again."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pgs = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        if not _alive_worker_actors() and not pgs and ray.available_resources().get("CPU") == NUM_CPUS:
            return
        time.sleep(0.2)
    raise AssertionError(f"leaked: actors {_alive_worker_actors()}, placement groups {pgs}, "
                         f"available {ray.available_resources()}")


@pytest.mark.parametrize("arch,transport", [("llama", "calls"), ("mistral", "dag")])
def test_tp2_matches_tp1_and_hf(checkpoints, arch, transport, monkeypatch):
    path = checkpoints[arch]
    prompts = _prompts(6, seed=len(arch))
    local = _generate(LLM(path, **ENGINE_KW), prompts)
    monkeypatch.setenv("PAGEDRAY_RAY_TRANSPORT", transport)
    llm = LLM(path, executor="ray", tensor_parallel_size=2, **ENGINE_KW)
    try:
        executor = llm.llm_engine.executor
        assert executor.transport == transport
        distributed = _generate(llm, prompts)
        assert llm.llm_engine.get_stats().num_preemptions > 0
        # Each rank holds all 24 blocks of its own KV heads: half of 2 heads, or the single head replicated.
        shapes = ray.get([w.__ray_call__.remote(lambda self: tuple(self.worker.cache.kv_caches[0].shape))
                          for w in executor.workers])
        kv_heads = 1
        assert shapes == [(2, 24, kv_heads, 4, 16)] * 2
    finally:
        llm.shutdown()
    _assert_released()
    _assert_same(distributed, local, abs=1e-5)
    hf = load_hf_model(path)
    _assert_same(distributed, [hf_greedy(hf, p, GREEDY.max_tokens) for p in prompts], abs=1e-4)


@pytest.mark.parametrize("transport", ["calls", "dag"])
def test_killed_rank_fails_fast_and_leaks_nothing(checkpoints, transport, monkeypatch):
    path = checkpoints["llama"]
    monkeypatch.setenv("PAGEDRAY_RAY_TRANSPORT", transport)
    llm = LLM(path, executor="ray", tensor_parallel_size=2, **ENGINE_KW)
    executor = llm.llm_engine.executor
    _generate(llm, _prompts(2, seed=3))
    # SIGKILL, as the OOM killer would: rank 0 then blocks in its next all-reduce, waiting for rank 1.
    os.kill(ray.get(executor.workers[1].ping.remote()), signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank\(s\) \[1\] of 2 died"):
        _generate(llm, _prompts(3, seed=4))
    assert time.monotonic() - start < 10
    with pytest.raises(EngineDeadError):   # the engine stays dead, it does not retry on a broken replica
        _generate(llm, _prompts(1, seed=5))
    llm.shutdown()
    _assert_released()


def test_bad_tp_is_a_value_error_then_a_replica_rebuilds(checkpoints):
    """A TP size the heads cannot be split by is a ValueError raised by the ranks that leaves
    nothing behind; the same Ray instance then gives a working replica."""
    path = checkpoints["llama"]
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
        LLM(path, executor="ray", tensor_parallel_size=3, **ENGINE_KW)
    _assert_released()
    prompts = _prompts(2, seed=6)
    llm = LLM(path, executor="ray", tensor_parallel_size=2, **ENGINE_KW)
    try:
        _assert_same(_generate(llm, prompts), _generate(LLM(path, **ENGINE_KW), prompts), abs=1e-5)
    finally:
        llm.shutdown()
    _assert_released()
