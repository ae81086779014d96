"""What the tests that kill or hang a replica mid-stream share (tests/cluster/serving/test_local_kill.py,
test_replica_hang.py, test_replicas_ray.py): one set of streams, one undisturbed reference run of
them per checkpoint, the frontend + gRPC server over ProcessClient or RayClient engine cores, a
health watcher, and the check that every stream came back whole."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import time
from types import SimpleNamespace

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testkit.grpc_cases import make_request, read_stream

from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.serving.frontend import Frontend
from pagedray.cluster.serving.server import GenerateServer
from pagedray.protos import generate_pb2_grpc as pb_grpc

ENGINE_KW = dict(device="cpu", block_size=4, num_kv_blocks=1024)
VOCAB = 320
SERVING = health_pb2.HealthCheckResponse.SERVING
SLOW_CORE = "testkit.slow_core:slow_engine_core"   # a real EngineCore whose steps sleep first


def cases() -> list[tuple[list[int], dict]]:
    """24 greedy streams and two seeded sampled ones (plain, and top-k + top-p): (token ids, params)."""
    rng = random.Random(2)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 10))] for _ in range(26)]
    kinds = [dict(temperature=0)] * 24 + [dict(temperature=1.0, seed=7),
                                          dict(temperature=0.7, top_k=20, top_p=0.9, seed=8)]
    return [(p, dict(k, max_tokens=40, ignore_eos=True)) for p, k in zip(prompts, kinds)]


@functools.cache
def _undisturbed(ckpt: str) -> tuple[tuple[int, ...], ...]:
    llm = LLM(ckpt, **ENGINE_KW)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p, _ in cases()],
                            [SamplingParams(**k) for _, k in cases()], use_tqdm=False)
    finally:
        llm.shutdown()
    return tuple(tuple(o.outputs[0].token_ids) for o in outs)


def undisturbed(ckpt: str) -> list[list[int]]:
    """The tokens of `cases()` from the offline engine in this process (computed once per checkpoint)."""
    return [list(t) for t in _undisturbed(ckpt)]


def open_streams(stub, prefix: str = "s") -> list:
    """One GenerateStream call per case, request ids `<prefix><i>`."""
    return [stub.GenerateStream(make_request(p, f"{prefix}{i}", **k)) for i, (p, k) in enumerate(cases())]


async def finish_streams(calls) -> list:
    """The rest of every stream: its messages, or the exception it raised."""
    return await asyncio.gather(*[read_stream(call) for call in calls], return_exceptions=True)


def whole_streams(firsts, rests) -> list[list[int]]:
    """Each stream's tokens: its first message's and the rest's; fails if any stream raised."""
    errors = [r for r in rests if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    return [list(f.completions[0].token_ids) + [t for m in rest for c in m.completions for t in c.token_ids]
            for f, rest in zip(firsts, rests)]


@contextlib.asynccontextmanager
async def watch_health(channel, every_s: float = 0.02):
    """Polls the server's health while the block runs; yields the list of statuses seen."""
    health, statuses, done = health_pb2_grpc.HealthStub(channel), [], asyncio.Event()

    async def watch():
        while not done.is_set():
            statuses.append((await health.Check(health_pb2.HealthCheckRequest())).status)
            await asyncio.sleep(every_s)

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        yield statuses
    finally:
        done.set()
        await watcher


@contextlib.asynccontextmanager
async def serving(ckpt: str, backend: str = "local", replicas: int = 1, *, engine_kw: dict | None = None,
                  prefix: str | None = None, max_migrations: int = 2, **client_kw):
    """`replicas` engine cores (backend "local": ProcessClient, "ray": RayClient) named `<prefix><n>`
    behind a Frontend that replaces a dead one, and a GenerateServer on 127.0.0.1 with a channel."""
    from pagedray.cluster.serving.process_client import ProcessClient
    from pagedray.cluster.serving.ray_client import RayClient
    kind = ProcessClient if backend == "local" else RayClient
    names = (f"{prefix or backend + '-'}{n}" for n in itertools.count())

    async def make():
        return kind(ckpt, dict(engine_kw or ENGINE_KW), name=next(names), **client_kw)

    frontend = await Frontend.start_with([await make() for _ in range(replicas)], client_factory=make,
                                         max_migrations=max_migrations)
    server = GenerateServer(frontend, "tiny", host="127.0.0.1", port=0)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield SimpleNamespace(frontend=frontend, router=frontend.router, channel=channel,
                              stub=pb_grpc.GenerationStub(channel), replicas=list(frontend.router.replicas))
    finally:
        await channel.close()
        await server.stop(grace=2)


def slow_clients(bound_s: float | None = None) -> dict:
    """Client settings for the kill tests: 50 ms steps keep streams running; liveness `bound_s`."""
    return dict(engine_kw=dict(ENGINE_KW, step_delay_s=0.05), core_factory=SLOW_CORE, startup_timeout_s=120,
                liveness_s=bound_s)


async def wait_until(predicate, timeout: float, what: str, every_s: float = 0.05) -> float:
    """Seconds until `predicate()` holds (AssertionError after `timeout`)."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(every_s)
    return time.monotonic() - t0
