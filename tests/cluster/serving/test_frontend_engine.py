"""The Frontend over two real engine cores (tiny random Llama, CPU, InprocClients): a core killed
mid-stream moves its greedy, seeded and n > 1 requests to the other with exactly the tokens of an
undisturbed run; a request cancelled while it moves holds no block anywhere."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from testkit.tiny_models import make_tiny_llama

from pagedray.cluster import LLM
from pagedray.cluster.core.engine_core import EngineCore
from pagedray.cluster.serving.frontend import Frontend
from pagedray.cluster.serving.inproc_client import InprocClient
from pagedray.common.sampling_params import SamplingParams

# Migration changes which requests batch together: compare with one torch thread (see conftest).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

KWARGS = dict(device="cpu", block_size=4, num_kv_blocks=512)
PROMPTS = [[1, 17 + i, 42, 99, 7 + i, 250 - i] for i in range(8)]
PARAMS = ([SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 5
          + [SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True),
             SamplingParams(temperature=0.8, top_k=50, seed=9, max_tokens=40, ignore_eos=True, logprobs=2),
             SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=40, ignore_eos=True)])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def undisturbed(model_path, one_torch_thread):
    llm = LLM(model_path, **KWARGS)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    llm.shutdown()
    return [[c.token_ids for c in o.outputs] for o in outs]


def _client(model_path: str, name: str) -> InprocClient:
    return InprocClient(lambda: EngineCore.from_kwargs(model_path, **KWARGS), name=name)


def _kill(client: InprocClient) -> None:
    def boom():
        raise RuntimeError("engine core killed")
    client.core.step = boom


async def _collect(frontend: Frontend, prompt: list[int], params: SamplingParams) -> list[list[int]]:
    tokens: dict[int, list[int]] = {}
    async with contextlib.aclosing(frontend.generate({"prompt_token_ids": prompt}, params)) as stream:
        async for out in stream:
            for c in out.outputs:
                tokens.setdefault(c.index, []).extend(c.token_ids)
    return [tokens[i] for i in sorted(tokens)]


def _used_blocks(client: InprocClient) -> int:
    return client.core.get_stats().num_used_blocks


def test_a_killed_core_s_requests_finish_on_the_other_with_undisturbed_tokens(model_path, undisturbed):
    async def scenario():
        a, b = _client(model_path, "a"), _client(model_path, "b")
        frontend = await Frontend.start_with([a, b])
        tasks = [asyncio.get_running_loop().create_task(_collect(frontend, p, s)) for p, s in zip(PROMPTS, PARAMS)]
        while a.core.generation_tokens_total < 40:      # mid-stream: a's requests have some tokens
            await asyncio.sleep(0.01)
        moved = frontend.router.num_inflight_on(a)
        _kill(a)
        results = await asyncio.gather(*tasks)
        stats = b.core.get_stats()
        await frontend.shutdown()
        return results, moved, stats

    results, moved, stats = asyncio.run(scenario())
    assert moved > 0
    assert results == undisturbed
    assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0)


@pytest.mark.parametrize("when", ["before the death is seen", "after the move"])
def test_cancel_during_a_move_leaves_no_block_held(model_path, when):
    async def scenario():
        a, b = _client(model_path, "a"), _client(model_path, "b")
        frontend = await Frontend.start_with([a, b])
        streams = [frontend.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=200, ignore_eos=True))
                   for p in PROMPTS[:4]]
        for s in streams:
            await s.__anext__()
        victims = [rid for rid, (c, _) in frontend.router._inflight.items() if c is a]
        assert victims
        _kill(a)
        if when == "after the move":
            while any(frontend._by_core[r].migrations == 0 for r in victims):   # the router knows core ids
                await asyncio.sleep(0.005)
        for s in streams:
            await s.aclose()
        for _ in range(500):
            if _used_blocks(b) == 0 and not b.core.has_unfinished_requests():
                break
            await asyncio.sleep(0.01)
        state = (_used_blocks(b), b.core.has_unfinished_requests(), frontend.num_pending,
                 frontend.router.num_pending, frontend.router.load.get("b"))
        await frontend.shutdown()
        return state

    assert asyncio.run(scenario()) == (0, False, 0, 0, 0)
