"""InprocClient: an EngineCore on a thread behind the EngineClient interface (tiny Llama, CPU)."""
from __future__ import annotations

import asyncio

import pytest

from testkit.tiny_models import make_tiny_llama

from pagedray.cluster.core.engine_core import EngineCore
from pagedray.cluster.core.messages import CoreRequest
from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.inproc_client import InprocClient
from pagedray.common.sampling_params import SamplingParams

PROMPTS = [[1, 17, 42, 99, 7], [1, 250, 3], [1, 64, 12, 9, 9, 9, 31]]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _params(max_tokens: int = 10) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


async def _read_until_done(client: InprocClient, ids: set[str]) -> dict[str, list[int]]:
    got: dict[str, list[int]] = {}
    async for batch in client.outputs():
        for out in batch.outputs:
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                ids.discard(out.request_id)
        if not ids:
            return got


def test_streams_equal_the_core_run_directly_and_abort_frees_blocks(model_path):
    core = EngineCore.from_kwargs(model_path, device="cpu", block_size=4)
    core.add([CoreRequest(f"d{i}", p, _params()) for i, p in enumerate(PROMPTS)])
    direct: dict[str, list[int]] = {}
    while core.has_unfinished_requests():
        for out in core.step().outputs:
            direct.setdefault(out.request_id.replace("d", "c"), []).extend(out.new_token_ids)

    async def scenario():
        client = InprocClient(lambda: core)
        await client.start()
        assert client.info.vocab_size == 320
        await client.add([CoreRequest(f"c{i}", p, _params()) for i, p in enumerate(PROMPTS)])
        got = await _read_until_done(client, {f"c{i}" for i in range(len(PROMPTS))})
        await client.add([CoreRequest("long", PROMPTS[0], _params(200))])
        await client.abort(["long"])
        stats = await client.get_stats()
        await client.shutdown()
        return got, stats

    got, stats = asyncio.run(scenario())
    assert got == direct
    assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0)


def test_a_failing_step_ends_the_outputs_with_engine_dead(model_path):
    core = EngineCore.from_kwargs(model_path, device="cpu", block_size=4)

    def broken(sched):
        raise RuntimeError("worker lost")

    core.executor.execute_model = core.executor.execute_model_async = broken

    async def scenario():
        client = InprocClient(lambda: core)
        await client.start()
        await client.add([CoreRequest("x", PROMPTS[0], _params())])
        with pytest.raises(EngineDeadError, match="worker lost"):
            async with asyncio.timeout(60):   # a core that never fails would hang here
                async for _ in client.outputs():
                    pass
        assert client.dead_error is not None
        with pytest.raises(EngineDeadError):
            await client.add([CoreRequest("y", PROMPTS[0], _params())])
        await client.shutdown()

    asyncio.run(scenario())
