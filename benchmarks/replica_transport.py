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

    python benchmarks/replica_transport.py --tokens 400 --streams 1 32
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--step-ms", type=float, default=0.0)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    actor = FakeEngine.remote(args.step_ms)
    for streams in args.streams:
        for mode in ("per-request", "batched"):
            measure(mode, actor, streams, 20)   # warm-up
            print(json.dumps(measure(mode, actor, streams, args.tokens)), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
