"""Two replicas behind the frontend and the gRPC server, on CPU with a tiny random Llama: engine
cores in subprocesses (ProcessClient, the local backend) or in Ray actors (RayClient). A replica
that hangs (SIGSTOP) mid-stream is found within the liveness bound, its streams finish on the other
one with the tokens of an undisturbed run, it gets no traffic once found, and it is replaced. A replica killed: requests sent right after all
succeed, and streams cancelled while they move leave no KV block held anywhere.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_checks import wait_gone
from grpc_cases import make_request as _request
from grpc_cases import read_stream as _read_stream
from tiny_models import make_tiny_llama

from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.serving.frontend import Frontend
from pagedray.cluster.serving.process_client import ProcessClient
from pagedray.cluster.serving.ray_client import RayClient
from pagedray.cluster.serving.server import GenerateServer
from pagedray.protos import generate_pb2_grpc as pb_grpc

ENGINE_KW = dict(device="cpu", block_size=4, num_kv_blocks=1024)
VOCAB = 320
BOUND = 3.0          # liveness bound of these clients (the default is 10 s)
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("replica_hang"))


@pytest.fixture(scope="module")
def ray_local():
    for name, value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_AUTH_MODE", "disabled"),
                        ("RAY_USAGE_STATS_ENABLED", "0")):
        os.environ[name] = value
    import ray
    # slow_core lives in tests/: the actors' workers inherit PYTHONPATH from the raylet.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + (os.pathsep + old if old else "")
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(params=["local", "ray"])
def backend(request) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_local")
    return request.param


def _cases() -> list[tuple[list[int], dict]]:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 10))] for _ in range(26)]
    kinds = [dict(temperature=0)] * 24 + [dict(temperature=1.0, seed=5), dict(temperature=0.7, top_k=20, seed=6)]
    return [(p, dict(k, max_tokens=30, ignore_eos=True)) for p, k in zip(prompts, kinds)]


@contextlib.asynccontextmanager
async def _serving(ckpt: str, backend: str):
    names = itertools.count()
    kind = ProcessClient if backend == "local" else RayClient

    async def make():
        return kind(ckpt, dict(ENGINE_KW, step_delay_s=0.05), name=f"{backend}-{next(names)}",
                    core_factory="slow_core:slow_engine_core", startup_timeout_s=120, liveness_s=BOUND)

    frontend = await Frontend.start_with([await make(), await make()], client_factory=make)
    server = GenerateServer(frontend, "tiny", host="127.0.0.1", port=0)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield frontend, pb_grpc.GenerationStub(channel), health_pb2_grpc.HealthStub(channel)
    finally:
        await channel.close()
        await server.stop(grace=2)


async def _until(predicate, timeout: float, what: str) -> float:
    """Seconds until `predicate()` holds (AssertionError after `timeout`)."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def test_hung_replica_is_found_within_the_bound_and_its_streams_finish_elsewhere(ckpt, backend):
    cases = _cases()
    llm = LLM(ckpt, **ENGINE_KW)
    want = [llm.generate({"prompt_token_ids": p}, SamplingParams(**k), use_tqdm=False)[0].outputs[0].token_ids
            for p, k in cases]
    llm.shutdown()

    async def scenario():
        async with _serving(ckpt, backend) as (frontend, stub, health):
            router, statuses, done = frontend.router, [], asyncio.Event()

            async def watch():
                while not done.is_set():
                    statuses.append((await health.Check(health_pb2.HealthCheckRequest())).status)
                    await asyncio.sleep(0.05)

            watcher = asyncio.get_running_loop().create_task(watch())
            calls = [stub.GenerateStream(_request(p, f"s{i}", **k)) for i, (p, k) in enumerate(cases)]
            firsts = [await call.read() for call in calls]          # all 26 mid-stream
            victim = router.replicas[0]
            doomed = router.num_inflight_on(victim)
            os.kill(victim.pid, signal.SIGSTOP)
            found_after = await _until(lambda: victim.dead_error is not None, 4 * BOUND, "the hang to be found")
            routed_then = router.routed[victim.name]
            after = await asyncio.gather(*[stub.Generate(_request([9, 4 + i], max_tokens=3, ignore_eos=True))
                                           for i in range(6)])
            rests = await asyncio.gather(*[_read_stream(call) for call in calls], return_exceptions=True)
            await _until(lambda: router.num_ready == 2, 120, "the replacement replica")
            done.set()
            await watcher
            return (victim, doomed, found_after, routed_then - router.routed[victim.name], after, firsts, rests,
                    statuses, [c.name for c in router.replicas])

    victim, doomed, found_after, new_on_victim, after, firsts, rests, statuses, names = asyncio.run(scenario())
    assert doomed > 0
    assert found_after < 4 * BOUND and "sent nothing" in str(victim.dead_error)
    assert new_on_victim == 0, "the hung replica got traffic after it was found"
    assert all(len(a.completions[0].token_ids) == 3 for a in after)
    errors = [r for r in rests if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    got = [list(f.completions[0].token_ids) + [t for m in rest for c in m.completions for t in c.token_ids]
           for f, rest in zip(firsts, rests)]
    assert got == want
    assert statuses and set(statuses) == {SERVING}
    assert victim.name not in names and len(names) == 2
    assert wait_gone(victim.pid, 20), "the hung core process was killed, not left stopped"


def test_requests_right_after_a_death_succeed_and_cancels_during_the_move_free_every_block(ckpt, backend):
    async def scenario():
        async with _serving(ckpt, backend) as (frontend, stub, _):
            router = frontend.router
            # 240 tokens at >= 50 ms a step: 12 s to finish by themselves, well past the 5 s below.
            calls = [stub.GenerateStream(_request([7, 8, 9 + i], f"c{i}", max_tokens=240, ignore_eos=True))
                     for i in range(8)]
            for call in calls:
                await call.read()
            victim = router.replicas[0]
            assert router.num_inflight_on(victim) > 0
            os.kill(victim.pid, signal.SIGKILL)
            # Sent right after the death, before the frontend may even know of it: all must succeed.
            quick = [asyncio.ensure_future(stub.Generate(_request([9, 3 + i], max_tokens=3, ignore_eos=True)))
                     for i in range(6)]
            await asyncio.sleep(0.01)            # the death is being handled: streams are moving
            for call in calls:
                call.cancel()
            await _until(lambda: victim.dead_error is not None and victim not in router.replicas,
                         4 * BOUND, "the death to be handled")
            survivor = router.replicas[0]

            async def used(clients) -> list[int]:
                return [(await c.get_stats()).num_used_blocks for c in clients]

            # Within 5 s of the kill, long before the streams could end by themselves.
            deadline = time.monotonic() + 5
            held = await used([survivor])
            while any(held) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                held = await used([survivor])
            quick = await asyncio.gather(*quick)
            await _until(lambda: router.num_ready == 2, 120, "the replacement replica")
            return (held + await used([c for c in router.replicas if c is not survivor]), frontend.num_pending,
                    quick)

    held, pending, quick = asyncio.run(scenario())
    assert held == [0, 0], f"blocks still held per replica: {held}"
    assert pending == 0
    assert all(len(q.completions[0].token_ids) == 3 for q in quick)
