"""Driver scenarios for the namespace cluster (tests/testkit/netns_cluster.py): each runs in the head
node's namespace (`python -m testkit.netns_scenarios NAME JSON-ARGS`), connected to the cluster by
RAY_ADDRESS, and prints one JSON line of what it saw; the tests assert on it.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time


def _node_ips() -> dict[str, str]:
    import ray
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}


def _alive_ips() -> set[str]:
    import ray
    return {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


def _actor_ips(class_name: str) -> list[str]:
    """The node IPs of live actors of `class_name` (what the dashboard would show)."""
    from ray._private.state import state
    return sorted(a["Address"]["IPAddress"] for a in state.actor_table(None).values()
                  if a["ActorClassName"].endswith(class_name) and a["State"] == "ALIVE")


def _reserve_one_cpu_per_worker():
    """Hold all but one CPU of every worker node, so a 2-rank group cannot fit one node."""
    import ray
    from ray.util.placement_group import placement_group
    bundles = []
    for n in ray.nodes():
        cpus = n["Resources"].get("CPU", 0)
        if n["Alive"] and cpus > 1:
            bundles.append({"CPU": cpus - 1, f"node:{n['NodeManagerAddress']}": 0.01})
    group = placement_group(bundles, strategy="SPREAD")
    ray.get(group.ready(), timeout=60)
    return group


def kill_namespace(namespace: str) -> None:
    """SIGKILL every process of a node's namespace (the node loses power)."""
    for _ in range(5):
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


# -- scenarios --------------------------------------------------------------------------------------------
def tp_across_nodes(args: dict) -> dict:
    """Offline LLM, TP=2 with the ranks on two nodes (cross-node TP asked for), against TP=1 here."""
    os.environ["PAGEDRAY_RAY_CROSS_NODE_TP"] = "1"
    from testkit.migration_cases import cases
    from pagedray.cluster import LLM, SamplingParams
    from pagedray.cluster.executors.ray_utils import init_ray
    prompts = [{"prompt_token_ids": p} for p, _ in cases()[:6]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine_kw = dict(device="cpu", block_size=4, num_kv_blocks=256)
    ref = LLM(args["ckpt"], **engine_kw)
    want = [o.outputs[0].token_ids for o in ref.generate(prompts, params, use_tqdm=False)]
    ref.shutdown()
    init_ray()
    hold = _reserve_one_cpu_per_worker()
    llm = LLM(args["ckpt"], tensor_parallel_size=2, executor="ray", **engine_kw)
    ranks = _actor_ips("WorkerActor")
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    llm.shutdown()
    del hold
    return {"want": want, "got": got, "rank_ips": ranks}


async def _replicas_node_kill(args: dict) -> dict:
    import grpc
    import ray
    from testkit.migration_cases import (ENGINE_KW, SLOW_CORE, finish_streams, open_streams, undisturbed,
                                         wait_until, whole_streams)
    from pagedray.cluster.executors.placement import Placer
    from pagedray.cluster.executors.ray_utils import init_ray
    from pagedray.cluster.serving.autoscaler import Autoscaler, AutoscalingConfig
    from pagedray.cluster.serving.frontend import Frontend
    from pagedray.cluster.serving.ray_client import RayClient
    from pagedray.cluster.serving.server import GenerateServer
    from pagedray.protos import generate_pb2_grpc as pb_grpc
    want = undisturbed(args["ckpt"])
    init_ray()
    placer = Placer()
    engine_kw = dict(ENGINE_KW, step_delay_s=0.05, **args.get("engine_kw", {}))

    def make(name: str) -> RayClient:
        return RayClient(args["ckpt"], engine_kw, name=name, core_factory=SLOW_CORE, startup_timeout_s=180,
                         liveness_s=5.0, placer=placer)

    frontend = Frontend()
    scaling = AutoscalingConfig(min_replicas=2, max_replicas=2, interval_s=0.2, retry_delay_s=2.0)
    autoscaler = Autoscaler(frontend.router, make, scaling)
    await autoscaler.start()
    await wait_until(lambda: frontend.router.num_ready == 2, 240, "two replicas")
    ips = _node_ips()
    before = {r.name: sorted(ips[n] for n in r.nodes) for r in frontend.router.replicas}
    server = GenerateServer(frontend, "tiny", host="127.0.0.1", port=0)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.GenerationStub(channel)
    calls = open_streams(stub)
    firsts = [await call.read() for call in calls]        # every stream is running
    victim = frontend.router.replicas[0]
    killed_ip = before[victim.name][0]
    t_kill = time.monotonic()
    kill_namespace(args["namespaces"][killed_ip])
    rests = await finish_streams(calls)
    errors = [repr(r) for r in rests if isinstance(r, BaseException)]
    got = whole_streams(firsts, rests) if not errors else []
    rebuilt = await wait_until(lambda: frontend.router.num_ready == 2 and victim not in frontend.router.replicas,
                               120, "the replacement replica")
    ips = _node_ips()
    after = {r.name: sorted(ips.get(n, n) for n in r.nodes) for r in frontend.router.replicas}
    await channel.close()
    await autoscaler.stop()
    await server.stop(grace=2)
    return {"want": want, "got": got, "errors": errors, "before": before, "after": after,
            "killed_ip": killed_ip, "rebuilt_s": time.monotonic() - t_kill, "waited_s": rebuilt,
            "alive_ips": sorted(_alive_ips())}


def replicas_node_kill(args: dict) -> dict:
    """Two replicas (spread over nodes) behind the gRPC server; one replica's node killed mid-stream."""
    return asyncio.run(_replicas_node_kill(args))


def _http_completion(port: int, prompt: str, max_tokens: int) -> str:
    import urllib.request
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())["choices"][0]["text"]


def pp_serve(args: dict) -> dict:
    """`pagedray serve` of one PP=2 replica whose stages must sit on two nodes (each worker has one CPU
    free), answering gRPC and HTTP; the offline engine here for reference."""
    import grpc
    from testkit.grpc_cases import make_request
    from testkit.serve_process import ServeProcess
    from pagedray.cluster import LLM, SamplingParams
    from pagedray.cluster.executors.ray_utils import init_ray
    from pagedray.protos import generate_pb2_grpc as pb_grpc
    prompt, tokens = "hello world", 10
    ref = LLM(args["ckpt"], device="cpu")
    want = ref.generate([prompt], SamplingParams(temperature=0, max_tokens=tokens), use_tqdm=False)[0].outputs[0]
    ref.shutdown()
    init_ray()
    hold = _reserve_one_cpu_per_worker()
    server = ServeProcess(["--model", args["ckpt"], "--served-model-name", "tiny", "--device", "cpu",
                           "--replica-backend", "ray", "--executor", "ray", "--pipeline-parallel-size", "2",
                           "--host", "127.0.0.1", "--port", "50051", "--http-port", "8000", "--block-size", "4",
                           "--num-kv-blocks", "256"])
    try:
        server.wait_for(r"ready: serving model 'tiny' on 127\.0\.0\.1:50051", timeout=300)
        ranks = _actor_ips("WorkerActor")
        with grpc.insecure_channel("127.0.0.1:50051") as channel:
            reply = pb_grpc.GenerationStub(channel).Generate(
                make_request(prompt, "pp0", temperature=0, max_tokens=tokens), timeout=120)
        got_grpc = list(reply.completions[0].token_ids)
        got_http = _http_completion(8000, prompt, tokens)
    finally:
        code = server.stop()
        del hold
    return {"want_ids": list(want.token_ids), "want_text": want.text, "grpc_ids": got_grpc, "http_text": got_http,
            "rank_ips": ranks, "exit_code": code}


async def _pp_node_kill(args: dict) -> dict:
    """One PP=2 replica over two nodes behind the frontend and the autoscaler; one of its nodes killed
    mid-stream."""
    import grpc
    from testkit.migration_cases import (SLOW_CORE, finish_streams, open_streams, undisturbed, wait_until,
                                         whole_streams)
    from pagedray.cluster.executors.placement import Placer
    from pagedray.cluster.executors.ray_utils import init_ray
    from pagedray.cluster.serving.autoscaler import Autoscaler, AutoscalingConfig
    from pagedray.cluster.serving.frontend import Frontend
    from pagedray.cluster.serving.ray_client import RayClient
    from pagedray.cluster.serving.server import GenerateServer
    from pagedray.protos import generate_pb2_grpc as pb_grpc
    want = undisturbed(args["ckpt"])
    init_ray()
    hold = _reserve_one_cpu_per_worker()
    placer = Placer()
    engine_kw = dict(device="cpu", block_size=4, num_kv_blocks=1024, executor="ray", pipeline_parallel_size=2,
                     step_delay_s=0.05)

    def make(name: str) -> RayClient:
        return RayClient(args["ckpt"], engine_kw, name=name, core_factory=SLOW_CORE, startup_timeout_s=240,
                         liveness_s=5.0, placer=placer)

    # What `serve --replica-backend ray --replicas 1` runs: the autoscaler replaces the dead replica and
    # the frontend parks the streams it could not move meanwhile.
    frontend = Frontend(max_migrations=2)
    scaling = AutoscalingConfig(min_replicas=1, max_replicas=1, interval_s=0.2, retry_delay_s=2.0)
    autoscaler = Autoscaler(frontend.router, make, scaling)
    await autoscaler.start()
    ips = _node_ips()
    first = frontend.router.replicas[0]
    before = sorted(ips[n] for n in first.nodes)
    server = GenerateServer(frontend, "tiny", host="127.0.0.1", port=0)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    calls = open_streams(pb_grpc.GenerationStub(channel))
    firsts = [await call.read() for call in calls]
    killed_ip = before[-1]
    t_kill = time.monotonic()
    kill_namespace(args["namespaces"][killed_ip])
    rests = await finish_streams(calls)
    errors = [repr(r) for r in rests if isinstance(r, BaseException)]
    got = whole_streams(firsts, rests) if not errors else []
    await wait_until(lambda: frontend.router.num_ready == 1 and first not in frontend.router.replicas, 120,
                     "the replacement replica")
    ips = _node_ips()
    after = sorted(ips.get(n, n) for n in frontend.router.replicas[0].nodes)
    await channel.close()
    await autoscaler.stop()
    await server.stop(grace=2)
    del hold
    return {"want": want, "got": got, "errors": errors, "before": before, "after": after, "killed_ip": killed_ip,
            "rebuilt_s": time.monotonic() - t_kill, "alive_ips": sorted(_alive_ips())}


def pp_node_kill(args: dict) -> dict:
    return asyncio.run(_pp_node_kill(args))


SCENARIOS = {"tp_across_nodes": tp_across_nodes, "replicas_node_kill": replicas_node_kill, "pp_serve": pp_serve,
             "pp_node_kill": pp_node_kill}

if __name__ == "__main__":
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = SCENARIOS[sys.argv[1]](json.loads(sys.argv[2]))
    print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)    # Ray's and gRPC's threads need not be waited for
