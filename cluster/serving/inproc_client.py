"""InprocClient: an EngineCore on a thread of this process, behind the EngineClient interface.

For tests and `serve --replica-backend inproc`: no process boundary, so no encoding; the core
shares the GIL with the front, which is exactly what the local-process and Ray clients avoid.
One thread owns the core and is the only one that calls it; the event loop hands it commands
through an inbox (applied in order before the next step) and gets each step's `CoreOutputs`
back through `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import AsyncIterator, Callable

from pagedray.cluster.core.messages import CoreOutputs, CoreRequest, EngineStats
from pagedray.cluster.serving.engine_client import EngineClient
from pagedray.common.errors import EngineDeadError

logger = logging.getLogger(__name__)

_names = itertools.count()


class InprocClient(EngineClient):
    def __init__(self, make_core: Callable[[], object], name: str | None = None) -> None:
        """`make_core`: builds the EngineCore (called on a worker thread by `start`)."""
        self.name = name or f"inproc-{next(_names)}"
        self._make_core = make_core
        self.core = None
        self._inbox: list[tuple] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[CoreOutputs | None] | None = None

    @classmethod
    def for_model(cls, model: str, name: str | None = None, **engine_kwargs) -> "InprocClient":
        """A client whose core is EngineCore.from_kwargs(model, **engine_kwargs) (LLM's keywords)."""
        from pagedray.cluster.core.engine_core import EngineCore
        return cls(lambda: EngineCore.from_kwargs(model, **engine_kwargs), name=name)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self.core = await asyncio.to_thread(self._make_core)
        self.info = self.core.info
        self._thread = threading.Thread(target=self._run, name=f"{self.name}-core", daemon=True)
        self._thread.start()

    # -- commands from the event loop ------------------------------------------------
    def _send(self, *command) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine core {self.name} failed: {self._dead}")
        with self._wakeup:
            self._inbox.append(command)
            self._wakeup.notify()

    async def add(self, requests: list[CoreRequest]) -> None:
        self._send("add", requests)

    async def abort(self, request_ids: list[str]) -> None:
        if self._dead is None:
            self._send("abort", list(request_ids))

    async def get_stats(self) -> EngineStats:
        future = self._loop.create_future()
        self._send("stats", future)
        return await future

    def outputs(self) -> AsyncIterator[CoreOutputs]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[CoreOutputs]:
        while True:
            batch = await self._queue.get()
            if batch is None:
                raise EngineDeadError(f"engine core {self.name} failed: {self._dead}")
            yield batch

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    async def shutdown(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.core is not None:
            await asyncio.to_thread(self.core.shutdown)

    # -- the core's thread -----------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        try:
            while True:
                with self._wakeup:
                    while not self._inbox and not self._stopping and not core.has_unfinished_requests():
                        self._wakeup.wait()
                    if self._stopping:
                        return
                    inbox, self._inbox = self._inbox, []
                for command in inbox:
                    self._apply(core, command)
                if inbox and not core.has_unfinished_requests():
                    # Idle now (an abort, say): the front's stats must not stay at the last step's.
                    self._emit(CoreOutputs([], core.get_stats(), time.monotonic()))
                if core.has_unfinished_requests():
                    batch = core.step()
                    if batch.outputs or batch.stats is not None:
                        self._emit(batch)
        except BaseException as exc:  # the executor failed: the requests in flight are not finished
            logger.exception("engine core %s failed", self.name)
            self._dead = exc
            self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

    def _emit(self, batch: CoreOutputs) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, batch)

    def _apply(self, core, command: tuple) -> None:
        kind, arg = command
        if kind == "add":
            core.add(arg)
        elif kind == "abort":
            core.abort(arg)
        else:
            stats = core.get_stats()
            self._loop.call_soon_threadsafe(lambda: arg.done() or arg.set_result(stats))
