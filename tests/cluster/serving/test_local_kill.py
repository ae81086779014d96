"""The embedded server's local backend (the engine core in a subprocess, ProcessClient) under a
SIGKILL of the core mid-stream: 24 greedy streams and two seeded sampled ones complete over gRPC
with exactly the tokens of an undisturbed run, no call fails, health never leaves SERVING, and the
engine process is restarted; with max_migrations=0 the calls fail UNAVAILABLE naming the cause."""
from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest

from testkit.grpc_cases import make_request, read_stream
from testkit.migration_cases import (SERVING, cases, finish_streams, open_streams, serving,
                             slow_clients, undisturbed, wait_until, watch_health, whole_streams)

from pagedray.cluster import SamplingParams
from pagedray.cluster.serving.frontend import Frontend
from pagedray.cluster.serving.process_client import ProcessClient
from pagedray.protos import generate_pb2 as pb


def test_killed_engine_process_restarts_and_every_stream_completes_unchanged(tiny_llama):
    want = undisturbed(tiny_llama)

    async def scenario():
        async with serving(tiny_llama, **slow_clients()) as s, watch_health(s.channel) as statuses:
            calls = open_streams(s.stub)
            firsts = [await call.read() for call in calls]          # all 26 mid-stream
            victim = s.router.replicas[0]
            os.kill(victim.pid, signal.SIGKILL)
            rests = await finish_streams(calls)
            replicas = [(c.name, c.pid) for c in s.router.replicas]
            models = await s.stub.ListModels(pb.ListModelsRequest())
            return victim.pid, firsts, rests, replicas, models, statuses   # statuses: complete on exit

    old_pid, firsts, rests, replicas, models, statuses = asyncio.run(scenario())
    assert whole_streams(firsts, rests) == want
    assert statuses and set(statuses) == {SERVING}
    assert len(replicas) == 1 and replicas[0][0] == "local-1" and replicas[0][1] != old_pid
    assert models.models[0].replicas == 1


def test_past_max_migrations_the_call_is_unavailable_naming_the_cause(tiny_llama):
    async def scenario():
        async with serving(tiny_llama, max_migrations=0, **slow_clients()) as s:
            call = s.stub.GenerateStream(make_request([5, 6, 7], "doomed", max_tokens=200, ignore_eos=True))
            await call.read()
            os.kill(s.router.replicas[0].pid, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await read_stream(call)
            return info.value

    error = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "max_migrations=0" in error.details() and "local-0" in error.details()


def test_a_stopped_engine_is_detected_its_streams_finish_elsewhere_and_it_gets_no_new_work(tiny_llama):
    """Two engine processes; one is SIGSTOPped (hung, not dead): within the liveness bound it is taken
    out of routing and its streams finish on the other with unchanged tokens; requests sent after
    all go to the other and succeed."""
    bound = 3.0
    some = cases()[:8]
    want = undisturbed(tiny_llama)[:8]

    async def collect(frontend, prompt, kwargs, rid):
        tokens = []
        async for out in frontend.generate({"prompt_token_ids": prompt}, SamplingParams(**kwargs), rid):
            tokens += out.outputs[0].token_ids if out.outputs else []
        return tokens

    async def scenario():
        settings = slow_clients(bound)
        engine_kw = settings.pop("engine_kw")
        clients = [ProcessClient(tiny_llama, engine_kw, name=f"p{i}", **settings) for i in range(2)]
        frontend = await Frontend.start_with(clients)
        try:
            tasks = [asyncio.get_running_loop().create_task(collect(frontend, p, k, f"s{i}"))
                     for i, (p, k) in enumerate(some)]
            await wait_until(lambda: frontend.router.num_pending >= len(some) and all(
                frontend._requests[f"s{i}"].state.completions[0].token_ids for i in range(len(some))),
                120, "every stream to have tokens", every_s=0.02)
            stopped = clients[0]
            moved = frontend.router.num_inflight_on(stopped)
            os.kill(stopped.pid, signal.SIGSTOP)
            # detected within the bound (with margin)
            await wait_until(lambda: stopped not in frontend.router.replicas, 10 * bound, "the hang to be found")
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
