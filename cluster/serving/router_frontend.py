"""Today's Router behind the Frontend API (PLAN.md "Frontend API"), for the HTTP server until
cluster/serving/frontend.py lands: the Router's cumulative outputs become deltas through the
same DeltaTracker the gRPC stream uses. Delete once the Frontend serves `pagedray serve`.
"""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

from pagedray.cluster.async_engine import DeltaTracker
from pagedray.cluster.core.messages import EngineInfo
from pagedray.cluster.outputs import RequestOutput
from pagedray.cluster.router import Router
from pagedray.workers.sampling_params import SamplingParams


class RouterFrontend:
    def __init__(self, router: Router) -> None:
        self.router = router

    async def generate(self, prompt: str | dict, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        tracker = DeltaTracker()
        async with contextlib.aclosing(self.router.generate(prompt, params, request_id)) as outputs:
            async for out in outputs:
                delta = tracker.delta(out)
                if delta.outputs or out.finished:
                    yield delta

    @property
    def tokenizer(self):
        return self.router.tokenizer

    @property
    def info(self) -> EngineInfo:
        config = self.router.model_config
        return EngineInfo(model=config.model, tokenizer=config.tokenizer, architecture=config.architecture,
                          max_model_len=config.max_model_len, vocab_size=config.vocab_size,
                          block_size=self.router.replicas[0].block_size, num_kv_blocks=0,
                          tensor_parallel_size=self.router.tensor_parallel_size)

    metrics = property(lambda self: self.router.metrics)
    is_healthy = property(lambda self: self.router.is_healthy)
    num_ready_replicas = property(lambda self: self.router.num_ready)

    async def get_stats(self):
        return await self.router.get_stats()

    async def shutdown(self) -> None:
        await self.router.shutdown()
