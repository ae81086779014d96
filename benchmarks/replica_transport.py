"""Driver-side cost per streamed output of a replica actor, for the two ways to stream.

A fake engine in a Ray async actor "steps" every `--step-ms` (0: as fast as it can) and
produces one small token delta per running request per step, the size of what
`RayReplica` sends (a few ints and a short string). The driver reads them:

- `per-request`: one Ray streaming generator per request (`num_returns="streaming"`),
  one object per output, awaited by the driver.
- `batched`: one long-poll call per replica returns every output produced since the
  last call (all requests together); the driver demultiplexes.

Reported: outputs delivered per second and driver CPU microseconds per output, at 1
and at `--streams` concurrent requests.

`--engine` instead runs the real engine (Llama shapes of `--preset`, dummy weights) as a
`LocalReplica` in this process and then as a `RayReplica` (engine in a Ray actor, outputs
through the batched poll), and reports output tokens per second and the driver's CPU
time for the same greedy requests: the end-to-end price of the actor hop.

    python benchmarks/replica_transport.py --tokens 400 --streams 1 32
    python benchmarks/replica_transport.py --engine --device cuda --preset 1b --tokens 128 --streams 1 32
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402


@ray.remote(num_cpus=0)
class FakeEngine:
    """Steps on a timer; each step every running request gets one delta."""

    def __init__(self, step_ms: float) -> None:
        self.step_s = step_ms / 1000
        self.running: dict[str, int] = {}       # rid -> tokens left
        self.streams: dict[str, asyncio.Queue] = {}
        self.outbox: list[tuple] = []
        self.has_output = asyncio.Event()
        self.wakeup = asyncio.Event()
        self.loop_task = None

    async def _step_loop(self) -> None:
        step = 0
        while True:
            if not self.running:
                self.wakeup.clear()
                await self.wakeup.wait()
            await asyncio.sleep(self.step_s)
            step += 1
            for rid in list(self.running):
                self.running[rid] -= 1
                done = self.running[rid] == 0
                delta = (rid, [step], " tok", done)
                if rid in self.streams:
                    self.streams[rid].put_nowait(delta)
                else:
                    self.outbox.append(delta)
                if done:
                    del self.running[rid]
            self.has_output.set()

    def _add(self, rid: str, tokens: int) -> None:
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._step_loop())
        self.running[rid] = tokens
        self.wakeup.set()

    async def stream(self, rid: str, tokens: int):
        self.streams[rid] = asyncio.Queue()
        self._add(rid, tokens)
        while True:
            delta = await self.streams[rid].get()
            yield delta
            if delta[3]:
                del self.streams[rid]
                return

    async def add(self, rid: str, tokens: int) -> None:
        self._add(rid, tokens)

    async def poll(self) -> list[tuple]:
        while not self.outbox:
            self.has_output.clear()
            await self.has_output.wait()
        out, self.outbox = self.outbox, []
        return out


async def per_request(actor, streams: int, tokens: int) -> int:
    async def one(i: int) -> int:
        n = 0
        async for ref in actor.stream.options(num_returns="streaming").remote(f"r{i}", tokens):
            await ref
            n += 1
        return n
    return sum(await asyncio.gather(*[one(i) for i in range(streams)]))


async def batched(actor, streams: int, tokens: int) -> int:
    await asyncio.gather(*[actor.add.remote(f"r{i}", tokens) for i in range(streams)])
    received, finished = 0, 0
    while finished < streams:
        batch = await actor.poll.remote()
        received += len(batch)
        finished += sum(1 for d in batch if d[3])
    return received


def measure(mode: str, actor, streams: int, tokens: int) -> dict:
    fn = per_request if mode == "per-request" else batched
    cpu0, t0 = time.process_time(), time.perf_counter()
    n = asyncio.run(fn(actor, streams, tokens))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"mode": mode, "streams": streams, "outputs": n, "outputs_per_s": round(n / wall),
            "driver_cpu_us_per_output": round(cpu / n * 1e6, 1)}


async def _engine_run(replica, streams: int, tokens: int) -> dict:
    from pagedray.workers.sampling_params import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    tag = time.perf_counter_ns()

    async def one(i: int) -> int:
        n = 0
        async for _ in replica.generate({"prompt_token_ids": [5 + i, 7, 9, 11]}, params, f"{tag}-{i}"):
            n += 1
        return n

    cpu0, t0 = time.process_time(), time.perf_counter()
    outputs = sum(await asyncio.gather(*[one(i) for i in range(streams)]))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"streams": streams, "tokens_per_s": round(streams * tokens / wall, 1),
            "ms_per_token_per_stream": round(wall / tokens * 1e3, 3), "outputs": outputs,
            "driver_cpu_s": round(cpu, 3)}


async def _engine_bench(args) -> None:
    import tempfile

    from ray_step_overhead import make_model_dir

    from pagedray.cluster.async_engine import AsyncEngine
    from pagedray.cluster.replica import LocalReplica, RayReplica
    path = make_model_dir(tempfile.mkdtemp(), args.preset, weights=False)
    kw = dict(device=args.device, load_format="dummy", max_model_len=2048, gpu_memory_utilization=0.5)
    for kind in ("ray", "local"):   # the actor frees its GPU memory on exit; this process would not
        if kind == "local":
            replica = LocalReplica(AsyncEngine.from_kwargs(path, **kw))
        else:
            replica = RayReplica(path, kw, name="bench")
            await replica.start()
        for streams in args.streams:
            await _engine_run(replica, streams, 8)   # warm-up (graphs, allocator)
            print(json.dumps({"replica": kind, **await _engine_run(replica, streams, args.tokens)}), flush=True)
        await replica.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--step-ms", type=float, default=0.0)
    ap.add_argument("--engine", action="store_true", help="LocalReplica vs RayReplica on the real engine")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="tiny")
    args = ap.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    if args.engine:
        asyncio.run(_engine_bench(args))
        ray.shutdown()
        return
    actor = FakeEngine.remote(args.step_ms)
    for streams in args.streams:
        for mode in ("per-request", "batched"):
            measure(mode, actor, streams, 20)   # warm-up
            print(json.dumps(measure(mode, actor, streams, args.tokens)), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
