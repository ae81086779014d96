"""Fake engine clients (no core) and a helper that holds requests on the Router, for router and
autoscaler tests: the Router only chooses and counts load, so nothing needs to stream."""
from __future__ import annotations

from pagedray.cluster.core.messages import EngineInfo, EngineStats
from pagedray.cluster.serving.engine_client import EngineClient
from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.router import Router

BLOCK = 4


class FakeReplica(EngineClient):
    def __init__(self, name: str) -> None:
        self.name = name
        self.info = EngineInfo(model="fake", tokenizer="fake", architecture="Fake", max_model_len=64,
                               vocab_size=320, block_size=BLOCK, num_kv_blocks=64, tensor_parallel_size=1)
        self.error: BaseException | None = None
        self.shut = False

    async def start(self) -> None:
        pass

    async def add(self, requests) -> None:
        pass

    async def abort(self, request_ids) -> None:
        pass

    async def get_stats(self) -> EngineStats:
        return EngineStats()

    async def outputs(self):
        raise EngineDeadError("a fake client streams nothing")
        yield

    @property
    def dead_error(self):
        return self.error

    is_healthy = property(lambda self: self.error is None and not self.shut)

    async def shutdown(self) -> None:
        self.shut = True


class Held:
    """Requests routed and held in flight until finished (what the Frontend does per request)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.where: dict[str, FakeReplica] = {}

    async def start(self, request_id: str, prompt_token_ids: list[int], n: int = 1) -> FakeReplica:
        client = self.router.choose(prompt_token_ids)
        self.router.assign(request_id, client, n)
        self.where[request_id] = client
        return client

    async def finish(self, request_id: str) -> None:
        self.where.pop(request_id)
        self.router.release(request_id)

    async def finish_all(self) -> None:
        for rid in list(self.where):
            await self.finish(rid)


def tokens(prefix: list[int], tail: list[int]) -> list[int]:
    return prefix + tail
