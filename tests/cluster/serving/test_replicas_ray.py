"""Replicas (engine cores in Ray actors, RayClient) behind the frontend and the gRPC server, on CPU
with a tiny random Llama.

One local Ray instance and one event loop serve the whole module (client readers and the grpc.aio
server live on that loop across tests). Two replicas are shared by the first tests; the
replica-kill test comes last among those because it kills one of them (the frontend replaces it).
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import grpc  # noqa: E402
import ray  # noqa: E402

from testkit.grpc_cases import CASES as ALL_CASES  # noqa: E402
from testkit.grpc_cases import make_request as _request  # noqa: E402
from testkit.grpc_cases import read_stream as _read_stream  # noqa: E402
from testkit.hf_compare import assert_greedy_match, engine_greedy  # noqa: E402
from testkit.migration_cases import (SERVING, VOCAB, finish_streams, open_streams, serving, undisturbed,  # noqa: E402
                             wait_until, watch_health, whole_streams)
from testkit.ray_clusters import start_local_ray  # noqa: E402
from testkit.tiny_models import copy_as_arch  # noqa: E402

from pagedray.cluster import LLM, SamplingParams  # noqa: E402
from pagedray.cluster.serving.autoscaler import Autoscaler, AutoscalingConfig  # noqa: E402
from pagedray.cluster.serving.frontend import Frontend  # noqa: E402
from pagedray.cluster.serving.ray_client import RayClient  # noqa: E402
from pagedray.models.llama import LlamaForCausalLM  # noqa: E402
from pagedray.models.registry import ModelRegistry  # noqa: E402
from pagedray.protos import generate_pb2 as pb  # noqa: E402
from pagedray.protos import generate_pb2_grpc as pb_grpc  # noqa: E402

NUM_CPUS = 6          # logical: 2 replicas x 1, up to 2 more for the autoscaler, 2 TP ranks
ENGINE_KW = dict(device="cpu", block_size=4, num_kv_blocks=512)


class MyLlamaForCausalLM(LlamaForCausalLM):
    """Stands in for a model class in a user's own script: registered in the driver only."""


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def ray_local():
    start_local_ray(NUM_CPUS)
    yield
    try:
        _assert_released()
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tiny_llama) -> str:
    return tiny_llama


@pytest.fixture(scope="module")
def served(loop, ray_local, ckpt):
    """Two Ray replicas behind a frontend (which replaces a dead one) and a GenerateServer on 127.0.0.1."""
    context = serving(ckpt, "ray", 2, engine_kw=ENGINE_KW, prefix="r")
    yield loop.run_until_complete(context.__aenter__())
    loop.run_until_complete(context.__aexit__(None, None, None))


# -- helpers -----------------------------------------------------------------------------------
def _live_actors(class_name: str) -> set[str]:
    from ray._private.state import actors   # the GCS table; the public state API needs the dashboard
    return {a["ActorID"] for a in actors().values() if a["ActorClassName"] == class_name and a["State"] != "DEAD"}


def _held_placement_groups(name: str | None = None) -> list[dict]:
    """Groups not removed (each replica holds one: placement.py), all or those of replica `name`."""
    return [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"
            and (name is None or pg["name"] == f"pagedray-replica:{name}")]


def _assert_released(timeout: float = 20.0) -> None:
    """No engine or worker actor left, no placement group held, every CPU free again."""
    deadline = time.monotonic() + timeout
    while True:
        pgs = _held_placement_groups()
        left = _live_actors("CoreActor") | _live_actors("WorkerActor")
        if not left and not pgs and ray.available_resources().get("CPU") == NUM_CPUS:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leaked: actors {left}, placement groups {pgs}, available "
                                 f"{ray.available_resources()}")
        time.sleep(0.2)


def _slow_steps(replica: RayClient, seconds: float) -> None:
    """Make the engine core inside the actor sleep before every step (keeps requests in flight)."""
    def patch(actor_self):
        core = actor_self.core
        real = core.step

        def slow():
            time.sleep(seconds)
            return real()
        core.step = slow
    ray.get(replica.actor.__ray_call__.remote(patch))


# -- the shared two replicas ------------------------------------------------------------------
# The first four of the server tests' cases (text, token ids, n=2, stop strings).
CASES = ALL_CASES[:4]


def test_results_equal_offline_api_and_load_spreads(loop, served, ckpt):
    rng = random.Random(0)
    greedy = [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 12))] for _ in range(12)]
    prompts = [p for _, p, _ in CASES] + [{"prompt_token_ids": p} for p in greedy]
    params = [s for _, _, s in CASES] + [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)] * len(greedy)
    offline = LLM(ckpt, **ENGINE_KW).generate(prompts, params, use_tqdm=False)
    requests = [r for r, _, _ in CASES] + [_request(p, temperature=0, max_tokens=6, ignore_eos=True)
                                           for p in greedy]

    async def scenario():
        unary = await asyncio.gather(*[served.stub.Generate(r) for r in requests])
        streams = await asyncio.gather(*[_read_stream(served.stub.GenerateStream(r)) for r in CASES[3][:1]])
        stats = await asyncio.gather(*[r.get_stats() for r in served.replicas])
        models = await served.stub.ListModels(pb.ListModelsRequest())
        return unary, streams, stats, models

    unary, streams, stats, models = loop.run_until_complete(scenario())
    for got, want in zip(unary, offline, strict=True):
        assert [c.index for c in got.completions] == [c.index for c in want.outputs]
        for c, w in zip(got.completions, want.outputs):
            assert c.text == w.text and list(c.token_ids) == w.token_ids
            if w.logprobs is not None:
                assert [lp.logprob for lp in c.logprobs] == pytest.approx(
                    [e[t] for e, t in zip(w.logprobs, w.token_ids)], abs=1e-4)
    # The stream's deltas add up to the same text.
    assert "".join(c.text for m in streams[0] for c in m.completions) == offline[3].outputs[0].text
    # Both replicas served: the router sent each some, and each engine saw prompt tokens.
    assert all(served.router.routed[r.name] >= 4 for r in served.replicas), served.router.routed
    assert all(s.prompt_tokens_total > 0 for s in stats)
    assert [(m.architecture, m.replicas) for m in models.models] == [("LlamaForCausalLM", 2)]


def test_same_prefix_goes_to_the_same_replica(loop, served):
    shared = list(range(40, 52))          # three full blocks of 4
    before = dict(served.router.routed)

    async def scenario():
        hits = {r.name: (await r.get_stats()).prefix_cache_hit_tokens for r in served.replicas}
        first = await served.stub.Generate(_request(shared + [7], max_tokens=2))
        rest = await asyncio.gather(*[served.stub.Generate(_request(shared + [8 + i, 9], max_tokens=2))
                                      for i in range(5)])
        after = {r.name: (await r.get_stats()).prefix_cache_hit_tokens for r in served.replicas}
        return [first, *rest], hits, after

    outs, hits, after = loop.run_until_complete(scenario())
    assert all(o.completions[0].token_ids for o in outs)
    routed = {name: served.router.routed[name] - before.get(name, 0) for name in served.router.routed}
    home = max(routed, key=routed.get)
    assert routed[home] == 6 and sum(routed.values()) == 6, routed
    # The shared blocks were reused on that replica: 5 requests x 12 cached tokens.
    assert after[home] - hits[home] >= 5 * 12


def test_killed_replica_s_streams_move_and_finish_with_undisturbed_tokens(loop, served, ckpt):
    """24 greedy streams and two seeded sampled ones; one replica's actor is killed mid-stream: every
    stream completes with exactly the tokens of an undisturbed run, no call fails, health never
    leaves SERVING, and a new replica replaces the dead one."""
    want = undisturbed(ckpt)
    for replica in served.replicas:
        _slow_steps(replica, 0.05)

    async def scenario():
        stub = served.stub
        async with watch_health(served.channel) as statuses:
            calls = open_streams(stub, "kill-")
            firsts = [await call.read() for call in calls]           # every stream is running
            victim = served.replicas[0]
            doomed = served.router.num_inflight_on(victim)
            ray.kill(victim.actor)
            rests = await finish_streams(calls)
            after = await asyncio.gather(*[stub.Generate(_request([9, i], max_tokens=3, ignore_eos=True))
                                           for i in range(4)])
            await wait_until(lambda: served.router.num_ready == 2, 60, "the replacement replica")
            models = await stub.ListModels(pb.ListModelsRequest())
        return victim, doomed, firsts, rests, after, models, statuses

    victim, doomed, firsts, rests, after, models, statuses = loop.run_until_complete(scenario())
    assert doomed > 0
    assert whole_streams(firsts, rests) == want
    assert statuses and set(statuses) == {SERVING}
    assert all(len(a.completions[0].token_ids) == 3 for a in after)
    assert not victim.is_healthy and victim not in served.router.replicas
    assert models.models[0].replicas == 2
    served.replicas[:] = served.router.replicas


# -- replicas of their own ----------------------------------------------------------------------
def test_autoscaler_scales_up_under_load_and_back_down(loop, ray_local, ckpt):
    config = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=0,
                               downscale_delay_s=1.0, interval_s=0.2)

    others = _live_actors("CoreActor")   # the shared replicas, still up

    async def scenario():
        frontend = Frontend()
        router = frontend.router
        scaler = Autoscaler(router, lambda name: RayClient(ckpt, ENGINE_KW, name=name), config)
        await scaler.start()
        first = router.replicas[0]
        assert router.num_ready == 1
        _slow_steps(first, 0.1)
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        load = [frontend.generate({"prompt_token_ids": [5, i]}, params) for i in range(4)]
        for gen in load:
            await gen.__anext__()                        # 4 in flight: 2 replicas wanted
        await wait_until(lambda: router.num_ready == 2, 60, "a second replica")
        second = next(r for r in router.replicas if r is not first)
        out = [o async for o in frontend.generate({"prompt_token_ids": [7, 8]}, SamplingParams(max_tokens=2))]
        assert router.routed[second.name] == 1 and out[-1].finished   # the new one takes new work
        actors_at_peak = _live_actors("CoreActor") - others
        for gen in load:
            await gen.aclose()                           # aborts them: now idle
        deadline = time.monotonic() + 10
        while (stats := await first.get_stats()).num_running or stats.num_used_blocks:
            assert time.monotonic() < deadline, f"closed streams still hold the engine: {stats}"
            await asyncio.sleep(0.05)
        await wait_until(lambda: router.num_ready == 1 and not scaler.draining, 30, "the scale-down")
        remaining = router.replicas
        await scaler.stop()
        await frontend.shutdown()
        return actors_at_peak, remaining

    actors_at_peak, remaining = loop.run_until_complete(scenario())
    assert len(remaining) == 1
    assert len(actors_at_peak) == 2
    deadline = time.monotonic() + 10
    while actors_at_peak & _live_actors("CoreActor") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not actors_at_peak & _live_actors("CoreActor")


def test_out_of_tree_model_reaches_the_replica_and_its_tp_workers(loop, ray_local, ckpt, tmp_path, scoped_registry):
    """A class registered in the driver only runs in the replica actor and in both TP ranks."""
    from ray import cloudpickle   # Ray's own copy: registering with the standalone package would not count
    user_ckpt = copy_as_arch(ckpt, tmp_path / "user", "MyLlamaForCausalLM")
    prompts = [{"prompt_token_ids": [5, 9, 14, 33, 3]}, {"prompt_token_ids": list(range(40, 61))}]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)
    want = [engine_greedy(o.outputs[0]) for o in LLM(ckpt, **ENGINE_KW).generate(prompts, greedy, use_tqdm=False)]
    # A test module is not importable on Ray workers: ship it by value, as cloudpickle does for `__main__`.
    module = sys.modules[MyLlamaForCausalLM.__module__]
    cloudpickle.register_pickle_by_value(module)
    ModelRegistry.register_model("MyLlamaForCausalLM", MyLlamaForCausalLM)

    async def scenario():
        replica = RayClient(user_ckpt, dict(ENGINE_KW, executor="ray", tensor_parallel_size=2), name="tp2")
        frontend = await Frontend.start_with([replica])

        async def final(prompt, request_id):
            async for whole in frontend.generate(prompt, greedy, request_id, final_only=True):
                return whole.outputs[0]

        try:
            got = []
            for i, prompt in enumerate(prompts):
                got.append(engine_greedy(await final(prompt, f"u{i}")))
            with pytest.raises(ValueError, match="vocabulary"):
                _ = [o async for o in frontend.generate({"prompt_token_ids": [5, VOCAB]}, greedy, "bad")]
            good_after = await final(prompts[0], "again")
            ray.kill(replica.actor)   # its TP ranks die with it; their placement group must be freed too
            return got, good_after
        finally:
            await frontend.shutdown()

    try:
        got, good_after = loop.run_until_complete(scenario())
    finally:
        ModelRegistry._models.pop("MyLlamaForCausalLM", None)
        ModelRegistry._user.discard("MyLlamaForCausalLM")
        cloudpickle.unregister_pickle_by_value(module)
    for i, (ours, ref) in enumerate(zip(got, want, strict=True)):   # TP=2 in the replica vs TP=1 here
        assert_greedy_match(ours, ref, atol=1e-5, what=f"prompt {i}")
    assert good_after.token_ids == got[0].tokens   # the same TP=2 engine: exactly
    deadline = time.monotonic() + 20
    while _live_actors("WorkerActor") or _held_placement_groups("tp2"):
        assert time.monotonic() < deadline, (_live_actors("WorkerActor"), _held_placement_groups("tp2"))
        time.sleep(0.2)


def test_startup_errors_are_value_errors_naming_the_setting(loop, ray_local, ckpt, tmp_path):
    """A bad setting, or a checkpoint folder that is not there, is a ValueError (the caller's to fix)."""
    async def scenario():
        bad = RayClient(ckpt, dict(ENGINE_KW, max_model_len=100_000), name="bad")
        with pytest.raises(ValueError, match="max_model_len") as bad_setting:
            await bad.start()
        missing = RayClient(str(tmp_path / "missing"), ENGINE_KW, name="missing")
        with pytest.raises(ValueError, match="missing") as no_checkpoint:
            await missing.start()
        return bad_setting.value, no_checkpoint.value

    bad_setting, no_checkpoint = loop.run_until_complete(scenario())
    assert "max_position_embeddings" in str(bad_setting)
    assert "not a local folder" in str(no_checkpoint)


def test_serve_cli_with_ray_replicas(ray_local, ckpt):
    """`pagedray serve --replica-backend ray --replicas 2` joins the running Ray cluster (as under
    `ray submit`), serves through both replicas and stops cleanly on SIGTERM."""
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagedray.cluster.cli", "serve", "--model", ckpt, "--served-model-name", "tiny",
         "--port", "0", "--device", "cpu", "--block-size", "4", "--num-kv-blocks", "256",
         "--replica-backend", "ray", "--replicas", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    try:
        port = None
        for line in proc.stderr:
            log.append(line)
            if match := re.search(r"ready: serving model 'tiny' on 127\.0\.0\.1:(\d+)", line):
                port = int(match.group(1))
                break
        assert port is not None, "".join(log)

        async def call():
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GenerationStub(channel)
                deadline = time.monotonic() + 60
                while (await stub.ListModels(pb.ListModelsRequest())).models[0].replicas < 2:
                    assert time.monotonic() < deadline, "the second replica never became ready"
                    await asyncio.sleep(0.2)
                return await asyncio.gather(*[stub.Generate(_request([5, i], max_tokens=3, ignore_eos=True))
                                              for i in range(4)])

        outs = asyncio.run(call())
        assert all(len(o.completions[0].token_ids) == 3 for o in outs)
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == 0, rest
        assert "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_more_than_one_replica_needs_the_ray_backend(capsys):
    from pagedray.cluster.cli import main
    # The CLI prints one `pagedray serve: error: ...` line and returns 2 (it no longer raises SystemExit).
    assert main(["serve", "--model", "/nonexistent", "--replicas", "2"]) == 2
    assert "needs --replica-backend ray" in capsys.readouterr().err
    assert main(["serve", "--model", "/nonexistent", "--replica-backend", "ray", "--min-replicas", "3",
                 "--max-replicas", "2"]) == 2
    assert "--min-replicas 3 must be <= --max-replicas 2" in capsys.readouterr().err
