"""The Frontend over fake engine cores (tests/testkit/core_fakes.py, on InprocClients): streams, coalescing,
abort, tokenization once and off the loop, oversized prompts, migration and its limits."""
from __future__ import annotations

import asyncio
import contextlib
import copy
import threading

import pytest

from testkit.core_fakes import FakeCore, fake_token
from testkit.tiny_tokenizer import make_tiny_tokenizer

from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.frontend import Frontend, QueueFullError
from pagedray.cluster.serving.inproc_client import InprocClient
from pagedray.common.sampling_params import SamplingParams

VOCAB = 320


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), VOCAB)


class CountingTokenizer:
    """A tokenizer proxy counting encode calls across its copies; `gate` (if set) blocks encode."""

    def __init__(self, inner, calls: list, gate: threading.Event | None = None) -> None:
        self.inner, self.calls, self.gate = inner, calls, gate

    def encode(self, text):
        self.calls.append(len(text))
        if self.gate is not None:
            assert self.gate.wait(60), "the test never released the tokenizer"
        return self.inner.encode(text)

    def __deepcopy__(self, memo):
        return CountingTokenizer(copy.deepcopy(self.inner), self.calls, self.gate)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _expected(prompt: list[int], n: int) -> list[int]:
    return [fake_token(prompt, i, VOCAB) for i in range(n)]


async def _frontend(tok, num_clients: int = 1, step_delay_s: float = 0.002, **kwargs) -> Frontend:
    clients = [InprocClient(lambda: FakeCore(step_delay_s=step_delay_s), name=f"fake-{i}")
               for i in range(num_clients)]
    return await Frontend.start_with(clients, tokenizer=tok, **kwargs)


async def _collect(frontend: Frontend, prompt, params, rid=None):
    """(token ids, text, finish reason, messages) of one stream."""
    messages = []
    async with contextlib.aclosing(frontend.generate(prompt, params, rid)) as stream:
        async for out in stream:
            messages.append(out)
    c = [m.outputs[0] for m in messages if m.outputs]
    return sum((x.token_ids for x in c), []), "".join(x.text for x in c), c[-1].finish_reason, messages


def _kill(client: InprocClient) -> None:
    """The core's next step raises, as a dead executor's would."""
    def boom():
        raise RuntimeError("fake core killed")
    client.core.step = boom


def test_streams_are_deltas_detokenized_once_and_match_the_fake_core(tok):
    async def scenario():
        frontend = await _frontend(tok)
        prompts = [[5, 6, 7], [9, 9], [1, 2, 3, 4]]
        results = await asyncio.gather(*[_collect(frontend, {"prompt_token_ids": p}, _greedy(12)) for p in prompts])
        for p, (tokens, text, reason, messages) in zip(prompts, results):
            assert tokens == _expected(p, 12) and reason == "length"
            assert text == tok.decode(tokens)
            assert all(m.outputs for m in messages) and messages[-1].finished
            assert sum(m.finished for m in messages) == 1
        assert frontend.num_pending == 0 and frontend.router.load == {"fake-0": 0}
        await frontend.shutdown()

    asyncio.run(scenario())


def test_a_reader_behind_gets_every_step_since_in_one_message(tok):
    async def scenario():
        frontend = await _frontend(tok)
        stream = frontend.generate({"prompt_token_ids": [3, 4]}, _greedy(10), "slow")
        first = await stream.__anext__()                       # the stream is admitted and running
        while not frontend._requests["slow"].state.finished:   # the core finishes while we do not read
            await asyncio.sleep(0.01)
        rest = [out async for out in stream]
        assert len(rest) == 1 and rest[0].finished             # coalesced: one message, not nine
        assert first.outputs[0].token_ids + rest[0].outputs[0].token_ids == _expected([3, 4], 10)
        await frontend.shutdown()

    asyncio.run(scenario())


def test_closing_a_stream_aborts_it_in_the_core(tok):
    async def scenario():
        frontend = await _frontend(tok)
        client = frontend.router.replicas[0]
        async with contextlib.aclosing(frontend.generate({"prompt_token_ids": [3]}, _greedy(250))) as s:
            await s.__anext__()
        for _ in range(200):
            if not client.core.running:
                break
            await asyncio.sleep(0.01)
        assert not client.core.running and frontend.num_pending == 0 and frontend.router.num_pending == 0
        assert client.core.generated < 250   # stopped early, not run to its end
        await frontend.shutdown()

    asyncio.run(scenario())


def test_bad_input_and_admission_limit(tok):
    async def scenario():
        frontend = await _frontend(tok, max_pending_requests=1)
        with pytest.raises(ValueError, match="vocabulary"):
            await _collect(frontend, {"prompt_token_ids": [1, 5000]}, _greedy())
        with pytest.raises(ValueError, match="max_tokens"):
            await _collect(frontend, {"prompt_token_ids": [1]}, SamplingParams(max_tokens=1000))
        held = frontend.generate({"prompt_token_ids": [3]}, _greedy(250))
        await held.__anext__()
        with pytest.raises(QueueFullError, match="max_pending_requests=1"):
            await _collect(frontend, {"prompt_token_ids": [3]}, _greedy())
        await held.aclose()
        await frontend.shutdown()

    asyncio.run(scenario())


def test_a_text_prompt_is_tokenized_once(tok):
    calls: list = []

    async def scenario():
        clients = [InprocClient(lambda: FakeCore(step_delay_s=0.002))]
        frontend = await Frontend.start_with(clients, tokenizer=CountingTokenizer(tok, calls))
        tokens, _, _, _ = await _collect(frontend, "Hello, my name is", _greedy(4))
        assert tokens == _expected(tok.encode("Hello, my name is"), 4)
        await frontend.shutdown()

    asyncio.run(scenario())
    assert calls == [len("Hello, my name is")]


def test_an_oversized_text_prompt_never_reaches_the_tokenizer(tok):
    calls: list = []

    async def scenario():
        clients = [InprocClient(lambda: FakeCore())]
        frontend = await Frontend.start_with(clients, tokenizer=CountingTokenizer(tok, calls))
        with pytest.raises(ValueError, match=r"prompt is 3000000 bytes.*max_model_len=256"):
            await _collect(frontend, "a" * 3_000_000, _greedy())
        await frontend.shutdown()

    asyncio.run(scenario())
    assert calls == []


def test_a_blocked_tokenizer_does_not_stop_other_streams(tok):
    gate = threading.Event()
    calls: list = []

    async def scenario():
        clients = [InprocClient(lambda: FakeCore(step_delay_s=0.002))]
        frontend = await Frontend.start_with(clients, tokenizer=CountingTokenizer(tok, calls, gate))
        slow = asyncio.get_running_loop().create_task(_collect(frontend, "Once upon a time", _greedy(3)))
        while not calls:                     # the text prompt is inside the tokenizer now, blocked
            await asyncio.sleep(0.01)
        async with asyncio.timeout(60):      # a blocked event loop would never get here
            tokens, _, _, _ = await _collect(frontend, {"prompt_token_ids": [7, 7]}, _greedy(20))
        assert tokens == _expected([7, 7], 20) and frontend.is_healthy and not slow.done()
        gate.set()
        assert (await slow)[2] == "length"
        await frontend.shutdown()

    asyncio.run(scenario())


def test_a_dying_client_s_streams_finish_on_the_other_with_the_same_tokens(tok):
    async def scenario():
        frontend = await _frontend(tok, num_clients=2)
        prompts = [[i + 1, i + 2] for i in range(8)]
        tasks = [asyncio.get_running_loop().create_task(_collect(frontend, {"prompt_token_ids": p}, _greedy(40)))
                 for p in prompts]
        victim = frontend.router.replicas[0]
        while victim.core.generated < 20:
            await asyncio.sleep(0.005)
        moved = frontend.router.num_inflight_on(victim)
        _kill(victim)
        results = await asyncio.gather(*tasks)
        for p, (tokens, _, reason, _) in zip(prompts, results):
            assert tokens == _expected(p, 40) and reason == "length"
        assert moved > 0 and frontend.router.replicas == [c for c in frontend.router.replicas if c is not victim]
        # Requests after the death all go to the survivor.
        after = await asyncio.gather(*[_collect(frontend, {"prompt_token_ids": p}, _greedy(3)) for p in prompts])
        assert all(r[0] == _expected(p, 3) for p, r in zip(prompts, after))
        assert frontend.is_healthy and frontend.num_ready_replicas == 1
        await frontend.shutdown()

    asyncio.run(scenario())


def test_past_max_migrations_the_stream_fails_naming_the_cause(tok):
    async def scenario():
        frontend = await _frontend(tok, num_clients=2, max_migrations=0)
        stream = frontend.generate({"prompt_token_ids": [4]}, _greedy(250))
        await stream.__anext__()
        _kill(frontend.router._inflight[next(iter(frontend.router._inflight))][0])
        with pytest.raises(EngineDeadError, match=r"fake core killed.*max_migrations=0"):
            async for _ in stream:
                pass
        await frontend.shutdown()

    asyncio.run(scenario())


def test_no_client_left_is_engine_dead_and_a_factory_replaces_the_dead_one(tok):
    async def scenario():
        lone = await _frontend(tok)
        stream = lone.generate({"prompt_token_ids": [4]}, _greedy(250))
        await stream.__anext__()
        _kill(lone.router.replicas[0])
        with pytest.raises(EngineDeadError, match="no healthy replica.*fake core killed"):
            async for _ in stream:
                pass
        assert not lone.is_healthy
        await lone.shutdown()

        async def factory():
            return InprocClient(lambda: FakeCore(step_delay_s=0.002), name="fake-new")

        frontend = await _frontend(tok, client_factory=factory)
        task = asyncio.get_running_loop().create_task(_collect(frontend, {"prompt_token_ids": [6]}, _greedy(50)))
        while frontend.router.replicas[0].core.generated < 10:
            await asyncio.sleep(0.005)
        _kill(frontend.router.replicas[0])
        tokens, _, reason, _ = await task
        assert tokens == _expected([6], 50) and reason == "length"
        assert [c.name for c in frontend.router.replicas] == ["fake-new"]
        await frontend.shutdown()

    asyncio.run(scenario())


def test_when_a_replacement_is_coming_the_lone_replica_s_streams_wait_for_it(tok, monkeypatch):
    """Under the autoscaler (Router.replaces_dead) a stream whose only replica died waits, then finishes
    on the replacement with the same tokens; one that waits past PARK_TIMEOUT_S fails naming it."""
    async def scenario():
        frontend = await _frontend(tok)
        frontend.router.replaces_dead = lambda: True
        task = asyncio.get_running_loop().create_task(_collect(frontend, {"prompt_token_ids": [6]}, _greedy(50)))
        while frontend.router.replicas[0].core.generated < 10:
            await asyncio.sleep(0.005)
        _kill(frontend.router.replicas[0])
        while frontend.router.replicas:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)
        assert not task.done()      # parked, not failed
        replacement = InprocClient(lambda: FakeCore(step_delay_s=0.002), name="fake-new")
        await replacement.start()
        frontend.router.add_replica(replacement)
        tokens, _, reason, _ = await task
        assert tokens == _expected([6], 50) and reason == "length"
        monkeypatch.setattr(Frontend, "PARK_TIMEOUT_S", 0.2)
        stream = frontend.generate({"prompt_token_ids": [4]}, _greedy(250))
        await stream.__anext__()
        _kill(replacement)
        with pytest.raises(EngineDeadError, match=r"no replica became ready within 0.2 s"):
            async for _ in stream:
                pass
        await frontend.shutdown()

    asyncio.run(scenario())
