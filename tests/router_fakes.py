"""Fake replicas (no model) and a helper that holds requests open, for router and autoscaler tests."""
from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

from pagedray.cluster.outputs import CompletionOutput, RequestOutput
from pagedray.cluster.replica import Replica
from pagedray.cluster.router import Router
from pagedray.workers.sampling_params import SamplingParams

BLOCK = 4


class FakeReplica(Replica):
    """Each request streams one output per `release()`; `finish_after` outputs end it."""

    def __init__(self, name: str, finish_after: int = 1) -> None:
        self.name = name
        self.healthy = True
        self.finish_after = finish_after
        self.received: list[str] = []
        self.gates: dict[str, asyncio.Queue] = {}
        self.shut = False
        self.callbacks = []

    is_healthy = property(lambda self: self.healthy and not self.shut)
    num_pending = property(lambda self: len(self.gates))
    model_config = SimpleNamespace(architecture="Fake", max_model_len=64)
    tokenizer = None
    tensor_parallel_size = 1
    block_size = BLOCK
    stats_snapshot = None

    def release(self, request_id: str) -> None:
        self.gates[request_id].put_nowait(None)

    async def generate(self, prompt, params, request_id):
        self.received.append(request_id)
        gate = self.gates[request_id] = asyncio.Queue()
        try:
            for i in range(1, self.finish_after + 1):
                await gate.get()
                done = i == self.finish_after
                yield RequestOutput(request_id, None, [1], [CompletionOutput(0, "x" * i, [7] * i, None,
                                                                             "length" if done else None)],
                                    finished=done)
        finally:
            self.gates.pop(request_id, None)

    async def abort(self, request_id):
        pass

    async def get_stats(self):
        raise NotImplementedError

    def on_dead(self, callback):
        self.callbacks.append(callback)

    async def shutdown(self):
        self.shut = True


class Held:
    """Requests started through the router and held open until released."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.tasks: dict[str, asyncio.Task] = {}

    async def start(self, request_id: str, prompt, n: int = 1) -> Replica:
        gen = self.router.generate(prompt, SamplingParams(n=n), request_id)
        self.tasks[request_id] = asyncio.get_running_loop().create_task(drain(gen))
        while request_id not in self.router._inflight:
            await asyncio.sleep(0)
        replica = self.router._inflight[request_id]
        while request_id not in replica.gates:
            await asyncio.sleep(0)
        return replica

    async def finish(self, request_id: str) -> list[RequestOutput]:
        replica = self.router._inflight[request_id]
        for _ in range(replica.finish_after):
            replica.release(request_id)
        return await self.tasks.pop(request_id)


async def drain(gen) -> list[RequestOutput]:
    async with contextlib.aclosing(gen) as outputs:
        return [out async for out in outputs]


def tokens(prefix: list[int], tail: list[int]) -> dict:
    return {"prompt_token_ids": prefix + tail}
