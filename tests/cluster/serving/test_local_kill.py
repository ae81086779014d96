"""The embedded server's local backend (the engine core in a subprocess, ProcessClient) under a
SIGKILL of the core mid-stream: 24 greedy streams and two seeded sampled ones complete over gRPC
with exactly the tokens of an undisturbed run, no call fails, health never leaves SERVING, and the
engine process is restarted; with max_migrations=0 the calls fail UNAVAILABLE naming the cause."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_cases import make_request as _request
from grpc_cases import read_stream as _read_stream
from tiny_models import make_tiny_llama

from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.serving.frontend import Frontend
from pagedray.cluster.serving.process_client import ProcessClient
from pagedray.cluster.serving.server import GenerateServer
from pagedray.protos import generate_pb2 as pb
from pagedray.protos import generate_pb2_grpc as pb_grpc

ENGINE_KW = dict(device="cpu", block_size=4, num_kv_blocks=1024)
VOCAB = 320
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("local_kill"))


def _cases() -> list[tuple[list[int], dict]]:
    rng = random.Random(2)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 10))] for _ in range(26)]
    kinds = [dict(temperature=0)] * 24 + [dict(temperature=1.0, seed=7), dict(temperature=0.8, top_p=0.9, seed=8)]
    return [(p, dict(k, max_tokens=30, ignore_eos=True)) for p, k in zip(prompts, kinds)]


@contextlib.asynccontextmanager
async def _serving(ckpt: str, max_migrations: int = 2):
    names = itertools.count()

    async def make():
        return ProcessClient(ckpt, dict(ENGINE_KW, step_delay_s=0.05), name=f"local-{next(names)}",
                             core_factory="slow_core:slow_engine_core", startup_timeout_s=120)

    frontend = await Frontend.start_with([await make()], client_factory=make, max_migrations=max_migrations)
    server = GenerateServer(frontend, "tiny", host="127.0.0.1", port=0)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield frontend, pb_grpc.GenerationStub(channel), health_pb2_grpc.HealthStub(channel)
    finally:
        await channel.close()
        await server.stop(grace=2)


def test_killed_engine_process_restarts_and_every_stream_completes_unchanged(ckpt):
    cases = _cases()
    llm = LLM(ckpt, **ENGINE_KW)
    want = [llm.generate({"prompt_token_ids": p}, SamplingParams(**k), use_tqdm=False)[0].outputs[0].token_ids
            for p, k in cases]
    llm.shutdown()

    async def scenario():
        async with _serving(ckpt) as (frontend, stub, health):
            statuses, done = [], asyncio.Event()

            async def watch():
                while not done.is_set():
                    statuses.append((await health.Check(health_pb2.HealthCheckRequest())).status)
                    await asyncio.sleep(0.02)

            watcher = asyncio.get_running_loop().create_task(watch())
            calls = [stub.GenerateStream(_request(p, f"s{i}", **k)) for i, (p, k) in enumerate(cases)]
            firsts = [await call.read() for call in calls]          # all 26 mid-stream
            victim = frontend.router.replicas[0]
            os.kill(victim.pid, signal.SIGKILL)
            rests = await asyncio.gather(*[_read_stream(call) for call in calls], return_exceptions=True)
            replicas = [(c.name, c.pid) for c in frontend.router.replicas]
            models = await stub.ListModels(pb.ListModelsRequest())
            done.set()
            await watcher
            return victim.pid, firsts, rests, replicas, models, statuses

    old_pid, firsts, rests, replicas, models, statuses = asyncio.run(scenario())
    errors = [r for r in rests if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    got = [list(f.completions[0].token_ids) + [t for m in rest for c in m.completions for t in c.token_ids]
           for f, rest in zip(firsts, rests)]
    assert got == want
    assert statuses and set(statuses) == {SERVING}
    assert len(replicas) == 1 and replicas[0][0] == "local-1" and replicas[0][1] != old_pid
    assert models.models[0].replicas == 1


def test_past_max_migrations_the_call_is_unavailable_naming_the_cause(ckpt):
    async def scenario():
        async with _serving(ckpt, max_migrations=0) as (frontend, stub, _):
            call = stub.GenerateStream(_request([5, 6, 7], "doomed", max_tokens=200, ignore_eos=True))
            await call.read()
            os.kill(frontend.router.replicas[0].pid, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _read_stream(call)
            return info.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "max_migrations=0" in error.details() and "local-0" in error.details()


def test_a_stopped_engine_is_detected_its_streams_finish_elsewhere_and_it_gets_no_new_work(ckpt):
    """Two engine processes; one is SIGSTOPped (hung, not dead): within the liveness bound it is taken
    out of routing and its streams finish on the other with unchanged tokens; requests sent after
    all go to the other and succeed."""
    bound = 3.0
    cases = _cases()[:8]
    llm = LLM(ckpt, **ENGINE_KW)
    want = [llm.generate({"prompt_token_ids": p}, SamplingParams(**k), use_tqdm=False)[0].outputs[0].token_ids
            for p, k in cases]
    llm.shutdown()

    async def collect(frontend, prompt, kwargs, rid):
        tokens = []
        async for out in frontend.generate({"prompt_token_ids": prompt}, SamplingParams(**kwargs), rid):
            tokens += out.outputs[0].token_ids if out.outputs else []
        return tokens

    async def scenario():
        clients = [ProcessClient(ckpt, dict(ENGINE_KW, step_delay_s=0.05), name=f"p{i}", liveness_s=bound,
                                 core_factory="slow_core:slow_engine_core", startup_timeout_s=120)
                   for i in range(2)]
        frontend = await Frontend.start_with(clients)
        try:
            tasks = [asyncio.get_running_loop().create_task(collect(frontend, p, k, f"s{i}"))
                     for i, (p, k) in enumerate(cases)]
            while frontend.router.num_pending < len(cases) or not all(
                    frontend._requests[f"s{i}"].state.completions[0].token_ids for i in range(len(cases))):
                await asyncio.sleep(0.02)                       # every stream has tokens
            stopped = clients[0]
            moved = frontend.router.num_inflight_on(stopped)
            os.kill(stopped.pid, signal.SIGSTOP)
            async with asyncio.timeout(10 * bound):            # detected within the bound (with margin)
                while stopped in frontend.router.replicas:
                    await asyncio.sleep(0.05)
            routed_before = dict(frontend.router.routed)
            after = await asyncio.gather(*[collect(frontend, [9, i], dict(max_tokens=3, ignore_eos=True), f"a{i}")
                                           for i in range(4)])
            results = await asyncio.gather(*tasks)
            routed = {k: frontend.router.routed[k] - routed_before.get(k, 0) for k in frontend.router.routed}
            return moved, results, after, routed, stopped.dead_error
        finally:
            await frontend.shutdown()

    moved, results, after, routed, error = asyncio.run(scenario())
    assert moved > 0 and results == want
    assert all(len(a) == 3 for a in after) and routed.get("p0", 0) == 0 and routed["p1"] == 4
    assert error is not None
