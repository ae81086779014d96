"""EngineClient: the one interface between the front and an engine core.

In-process, local-subprocess and Ray-actor implementations behave the same: `add` and `abort`
are ordered and never block on the engine's step; `outputs()` yields one `CoreOutputs` batch per
engine step for all of this client's requests; when the core dies or stops answering within
the liveness bound, `outputs()` raises `EngineDeadError` and `dead_error` is set: the front then
migrates the client's requests elsewhere.
"""
from __future__ import annotations

import abc
from typing import AsyncIterator

from pagedray.cluster.core.messages import CoreOutputs, CoreRequest, EngineInfo, EngineStats


class EngineClient(abc.ABC):
    name: str
    info: EngineInfo          # set once `start()` returned

    @abc.abstractmethod
    async def start(self) -> None:
        """Start (or connect to) the core and wait until it can take requests."""

    @abc.abstractmethod
    async def add(self, requests: list[CoreRequest]) -> None:
        """Queue requests (already validated by the front)."""

    @abc.abstractmethod
    async def abort(self, request_ids: list[str]) -> None:
        """Stop requests and free their blocks; unknown ids are ignored."""

    @abc.abstractmethod
    async def get_stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def outputs(self) -> AsyncIterator[CoreOutputs]:
        """One batch per engine step; raises EngineDeadError when the core is gone or hung."""

    @property
    @abc.abstractmethod
    def dead_error(self) -> BaseException | None: ...

    @property
    def is_healthy(self) -> bool:
        """Alive as far as the front knows (routing skips a client that is not)."""
        return self.dead_error is None

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
