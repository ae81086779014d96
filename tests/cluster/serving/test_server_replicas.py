"""The server over a frontend of two in-process replicas (no Ray): requests spread, frontend
metrics (replica gauge, latencies, engine counters summed), one engine failing mid-request: its
requests move to the other, no call fails, health stays SERVING."""
from __future__ import annotations

import asyncio
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from testkit.grpc_cases import make_request as _request

from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.serving.frontend import Frontend
from pagedray.cluster.serving.inproc_client import InprocClient
from pagedray.cluster.serving.server import GenerateServer
from pagedray.protos import generate_pb2 as pb
from pagedray.protos import generate_pb2_grpc as pb_grpc

ENGINE_KW = dict(device="cpu", block_size=4, num_kv_blocks=256)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {name: float(value) for line in text.splitlines() if line and not line.startswith("#")
            for name, _, value in [line.rpartition(" ")]}


def test_two_local_replicas_behind_the_server(tiny_llama):
    prompts = [[5 + i, 7, 11 + i] for i in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = LLM(tiny_llama, **ENGINE_KW).generate([{"prompt_token_ids": p} for p in prompts], greedy,
                                                 use_tqdm=False)

    async def scenario():
        clients = [InprocClient.for_model(tiny_llama, name=f"local-{i}", **ENGINE_KW) for i in range(2)]
        frontend = await Frontend.start_with(clients)
        router = frontend.router
        server = GenerateServer(frontend, "tiny", port=0, metrics_port=0)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.GenerationStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                outs = await asyncio.gather(*[stub.Generate(_request(p, temperature=0, max_tokens=5,
                                                                     ignore_eos=True)) for p in prompts])
                routed = dict(router.routed)
                before = await asyncio.to_thread(_scrape, server.metrics_port)

                def broken_step():
                    raise RuntimeError("CUDA error: an illegal memory access")
                clients[0].core.step = broken_step
                results = await asyncio.gather(*[stub.Generate(_request([9, i], max_tokens=3, ignore_eos=True)) for i in range(2)],
                                               return_exceptions=True)
                await asyncio.sleep(0.05)
                status = (await health.Check(health_pb2.HealthCheckRequest())).status
                later = await asyncio.gather(*[stub.Generate(_request([9, i], max_tokens=3, ignore_eos=True))
                                               for i in range(3)])
                models = await stub.ListModels(pb.ListModelsRequest())
                after = await asyncio.to_thread(_scrape, server.metrics_port)
                return outs, routed, before, results, status, later, models, after
        finally:
            await server.stop(grace=2)

    outs, routed, before, results, status, later, models, after = asyncio.run(scenario())
    assert [list(o.completions[0].token_ids) for o in outs] == [w.outputs[0].token_ids for w in want]
    assert routed == {"local-0": 3, "local-1": 3}
    assert before["pagedray_replicas"] == 2
    assert before["pagedray_time_to_first_token_seconds_count"] == 6
    assert before['pagedray_completions_finished_total{finish_reason="length"}'] == 6
    assert before["pagedray_prompt_tokens_total"] == 18            # summed over both engines
    # One request went to the broken engine: it moved to the other, and no call failed.
    assert all(len(r.completions[0].token_ids) == 3 for r in results)
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert all(len(o.completions[0].token_ids) == 3 for o in later)
    assert models.models[0].replicas == 1 and after["pagedray_replicas"] == 1
