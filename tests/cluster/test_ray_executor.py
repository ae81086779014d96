"""The Ray executor on CPU: TP=2 over gloo against TP=1 and HF transformers; worker death.

One local Ray instance (4 CPUs) serves the whole module; each executor takes 2 of them.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

# Before Ray: this module sets the variables Ray reads at import (traffic on 127.0.0.1).
from testkit.ray_engine_cases import (ENGINE_KW, GREEDY, NUM_CPUS, checkpoints, generate,  # noqa: F401
                                      random_prompts, ray_local)

import ray

from testkit.hf_compare import assert_greedy_match
from testkit.hf_reference import hf_greedy
from testkit.tiny_models import load_hf_model

from pagedray.cluster import LLM
from pagedray.cluster.engine import EngineDeadError


def _assert_same(got, want, abs: float) -> None:
    """tests/testkit/hf_compare.py's rule, prompt by prompt: the chosen tokens' logprobs within `abs`."""
    for i, (ours, ref) in enumerate(zip(got, want, strict=True)):
        assert_greedy_match(ours, ref, atol=abs, what=f"prompt {i}")


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


@pytest.mark.parametrize("arch,transport", [("llama", "calls"), ("mixtral", "dag")])
def test_tp2_matches_tp1_and_hf(checkpoints, arch, transport, monkeypatch):
    path = checkpoints[arch]
    prompts = random_prompts(6, seed=len(arch))
    local = generate(LLM(path, **ENGINE_KW), prompts)
    monkeypatch.setenv("PAGEDRAY_RAY_TRANSPORT", transport)
    llm = LLM(path, executor="ray", tensor_parallel_size=2, **ENGINE_KW)
    try:
        executor = llm.llm_engine.executor
        assert executor.transport == transport
        distributed = generate(llm, prompts)
        assert llm.llm_engine.get_stats().num_preemptions > 0
        # Each rank holds all 24 blocks of its own KV heads: one of the 2.
        shapes = ray.get([w.__ray_call__.remote(lambda self: tuple(self.worker.cache.kv_caches[0].shape))
                          for w in executor.workers])
        assert shapes == [(2, 24, 1, 4, 16)] * 2
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
    generate(llm, random_prompts(2, seed=3))
    # SIGKILL, as the OOM killer would: rank 0 then blocks in its next all-reduce, waiting for rank 1.
    os.kill(ray.get(executor.workers[1].ping.remote()), signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank\(s\) \[1\] of 2 died"):
        generate(llm, random_prompts(3, seed=4))
    assert time.monotonic() - start < 10
    with pytest.raises(EngineDeadError):   # the engine stays dead, it does not retry on a broken replica
        generate(llm, random_prompts(1, seed=5))
    llm.shutdown()
    _assert_released()


def test_bad_tp_is_a_value_error_then_a_replica_rebuilds(checkpoints):
    """A TP size the heads cannot be split by is a ValueError raised by the ranks that leaves
    nothing behind; the same Ray instance then gives a working replica."""
    path = checkpoints["llama"]
    with pytest.raises(ValueError, match="divisible by the tensor-parallel size"):
        LLM(path, executor="ray", tensor_parallel_size=3, **ENGINE_KW)
    _assert_released()
    prompts = random_prompts(2, seed=6)
    llm = LLM(path, executor="ray", tensor_parallel_size=2, **ENGINE_KW)
    try:
        _assert_same(generate(llm, prompts), generate(LLM(path, **ENGINE_KW), prompts), abs=1e-5)
    finally:
        llm.shutdown()
    _assert_released()


def test_executors_back_to_back_and_ranks_dying_at_start_up(checkpoints, monkeypatch, tmp_path, caplog):
    """The first build's ranks die before holding anything (as when Ray fails a fresh worker process on
    a loaded host) and are started again; it is torn down and a second executor is built at once."""
    import logging
    from ray import cloudpickle
    import testkit.ray_workers as ray_workers
    from pagedray.cluster.config import build_engine_config
    from pagedray.cluster.executors.ray import RayExecutor
    cloudpickle.register_pickle_by_value(ray_workers)   # the ranks' processes need not import tests/
    monkeypatch.setenv("PAGEDRAY_TEST_MARKER", str(tmp_path))
    config = build_engine_config(checkpoints["llama"], executor="ray", tensor_parallel_size=2, **ENGINE_KW)
    with caplog.at_level(logging.WARNING, logger="pagedray.cluster.executors.ray"):
        first = RayExecutor(config, worker_cls=ray_workers.DiesOnceWorker)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]
    # Which ranks are seen dead in a round depends on when their processes start; Ray's reason is named.
    assert re.search(r"attempt 1 of 3: rank\(s\) \[[01, ]+\] of 2 died during finding a rendezvous port: "
                     r"ActorDiedError: .*Worker exit type", caplog.text), caplog.text
    assert first.num_kv_blocks == 24
    first.shutdown()
    second = RayExecutor(config)          # right after the first one's shutdown
    try:
        assert second.num_kv_blocks == 24 and len(second.workers) == 2
    finally:
        second.shutdown()
    _assert_released()


def test_tp2_with_ngram_speculation_matches_tp1(checkpoints):
    """n-gram proposals verified across 2 ranks (rank 0 samples): greedy output as without speculation."""
    path = checkpoints["llama"]
    prompts = [p * 3 for p in random_prompts(4, seed=5)]          # repeated text: the lookup finds matches
    local = generate(LLM(path, **ENGINE_KW), prompts)
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
            "backoff_after_failed_steps": 0}    # (every step with proposals verifies)
    llm = LLM(path, executor="ray", tensor_parallel_size=2, speculative_config=spec, **ENGINE_KW)
    try:
        distributed = generate(llm, prompts)
        assert llm.llm_engine.get_stats().spec_num_draft_tokens > 0
    finally:
        llm.shutdown()
    _assert_released()
    _assert_same(distributed, local, abs=1e-5)


def _record_proposals(monkeypatch) -> dict[tuple[int, ...], list[int]]:
    """The workers' proposals as the driver receives them, keyed by the request's tokens so far."""
    from pagedray.cluster.core.spec import SpecDecoding
    seen: dict[tuple[int, ...], list[int]] = {}
    propose = SpecDecoding.propose

    def recording(self, request, worker_drafts):
        if worker_drafts:
            seen[tuple(request.all_token_ids)] = list(worker_drafts)
        return propose(self, request, worker_drafts)
    monkeypatch.setattr(SpecDecoding, "propose", recording)
    return seen


@pytest.mark.parametrize("method", ["draft_model", "eagle", "eagle3"])
def test_tp2_with_a_drafter_matches_tp1(checkpoints, method, tmp_path, monkeypatch):
    """A draft model (the target's own weights: every proposal is accepted) or an EAGLE / EAGLE-3 head,
    sharded over 2 ranks with the target: greedy output as TP=1 without speculation, and the same
    proposals as the unsharded drafter makes at TP=1."""
    from testkit.eagle_heads import make_eagle_head
    from transformers import AutoConfig
    path = checkpoints["llama"]
    prompts = random_prompts(4, seed=9)
    model = path if method == "draft_model" else make_eagle_head(
        tmp_path / method, AutoConfig.from_pretrained(path), eagle3=method == "eagle3",
        draft_vocab_size=160 if method == "eagle3" else None)
    # (every step verifies: the random drafts' proposals fail, which would back speculation off)
    spec = {"method": method, "model": model, "num_speculative_tokens": 3, "backoff_after_failed_steps": 0}
    plain = generate(LLM(path, **ENGINE_KW), prompts)
    proposals = _record_proposals(monkeypatch)
    generate(LLM(path, speculative_config=spec, **ENGINE_KW), prompts)
    single = dict(proposals)
    proposals.clear()
    llm = LLM(path, executor="ray", tensor_parallel_size=2, speculative_config=spec, **ENGINE_KW)
    try:
        distributed = generate(llm, prompts)
        stats = llm.llm_engine.get_stats()
    finally:
        llm.shutdown()
    _assert_released()
    _assert_same(distributed, plain, abs=1e-5)
    # Keyed by the tokens so far: a near-tie the two runs broke apart would only drop keys.
    common = single.keys() & proposals.keys()
    assert len(common) >= 0.8 * len(single) > 0
    assert {k: proposals[k] for k in common} == {k: single[k] for k in common}
    assert stats.spec_num_draft_tokens > 0
    if method == "draft_model":
        assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
