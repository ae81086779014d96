"""LoRA on the driver side, without a model: the scheduler keeps a step within max_loras adapters
(others go first meanwhile), prefix-cache keys differ per adapter, the router prefers a replica
that already ran the adapter, and a migrated request keeps its adapter."""
from __future__ import annotations

import asyncio

from testkit.router_fakes import FakeReplica

from pagedray.cluster.config import SchedulerConfig
from pagedray.cluster.core.block_hash import block_hashes
from pagedray.cluster.core.messages import CoreRequest
from pagedray.cluster.core.request import Request
from pagedray.cluster.core.scheduler import Scheduler
from pagedray.cluster.serving.migration import resume_requests
from pagedray.cluster.serving.output_processor import OutputProcessor
from pagedray.cluster.serving.router import Router
from pagedray.common.lora import LoRARequest
from pagedray.common.sampling_params import SamplingParams

LORAS = [LoRARequest(f"l{i}", i, f"/adapters/l{i}") for i in (1, 2, 3)]


def test_scheduler_admits_at_most_max_loras_adapters_and_lets_others_pass():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64), 4, 64,
                      True, max_loras=2)
    reqs = [Request("a", [1, 2, 3], SamplingParams(max_tokens=4), lora_request=LORAS[0]),
            Request("b", [1, 2, 3], SamplingParams(max_tokens=4), lora_request=LORAS[1]),
            Request("c", [1, 2, 3], SamplingParams(max_tokens=4), lora_request=LORAS[2]),
            Request("d", [1, 2, 3], SamplingParams(max_tokens=4)),
            Request("e", [4, 5, 6], SamplingParams(max_tokens=4), lora_request=LORAS[0])]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert set(out.num_scheduled_tokens) == {"a", "b", "d", "e"}   # "c" waits for a slot
    assert {r.req_id: r.lora_request for r in out.scheduled_new_reqs}["e"] == LORAS[0]
    sched.finish_requests(["a", "e"], reqs[0].status.__class__.FINISHED_STOPPED)
    assert "c" in sched.schedule().num_scheduled_tokens   # l1's slot is free again


def test_prefix_keys_differ_per_adapter_and_match_the_router():
    tokens = list(range(16))
    base = block_hashes(tokens, 4)
    one = block_hashes(tokens, 4, salt=LORAS[0].cache_salt())
    two = block_hashes(tokens, 4, salt=LORAS[1].cache_salt())
    assert not set(base) & set(one) and not set(one) & set(two)
    req = Request("x", tokens, SamplingParams(), lora_request=LORAS[0])
    assert req.cache_salt == LORAS[0].cache_salt()


def test_router_prefers_the_replica_that_ran_the_adapter():
    async def scenario():
        replicas = [FakeReplica(f"r{i}") for i in range(3)]
        router = Router(replicas, affinity_slack=8)
        first = router.choose([1, 2], lora_request=LORAS[0])   # no full block: no prefix affinity
        router.assign("a", first, 1)
        # Another prompt with the same adapter goes to the same replica while within the slack...
        assert router.choose([7, 8], lora_request=LORAS[0]) is first
        # ...but not once that replica is busier than the slack allows.
        router.assign("big", first, 100)
        assert router.choose([9, 9], lora_request=LORAS[0]) is not first

    asyncio.run(scenario())


def test_migration_keeps_the_adapter():
    core = CoreRequest("r", [1, 2, 3], SamplingParams(max_tokens=8), lora_request=LORAS[1])
    processor = OutputProcessor(None)
    state = processor.add_request("r", None, [1, 2, 3], core.params)
    (resumed,) = resume_requests(core, state)
    assert resumed.lora_request == LORAS[1]
