"""ProcessClient: an engine core in a local subprocess, reached over ZMQ ipc:// sockets.

`ZmqCoreClient` is the front's half of the wire in cluster/core/process.py, shared with the
Ray-actor client: it sends adds/aborts without waiting (no queue limit), and one reader task on
the event loop (zmq.asyncio) decodes each frame, hands CoreOutputs to `outputs()` in order and
answers `get_stats()`. Liveness: the core sends at least a heartbeat every `heartbeat_s`; no frame
within `liveness_s` (PAGEDRAY_ENGINE_LIVENESS_S, default 10 s) makes the client dead, as does the
process exiting (seen at once: its sentinel fd is on the event loop). Dead: `dead_error` is set,
`outputs()` yields what arrived before and then raises EngineDeadError naming the cause.

Transport and encoding were chosen by benchmarks/replica_transport.py (see docs/perf-notes/history.md).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import multiprocessing
import os
import shutil
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from pagedray.cluster.core.messages import CoreOutputs, CoreRequest, EngineInfo, EngineStats
from pagedray.cluster.core.process import DEFAULT_CORE_FACTORY, CoreStartup, Wire, run_engine_core
from pagedray.cluster.serving.engine_client import EngineClient
from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.ipc_dirs import make_ipc_dir
from pagedray.common import envs

logger = logging.getLogger(__name__)

__all__ = ["ProcessClient", "ZmqCoreClient"]

_DEAD = object()   # ends the outputs queue


class ZmqCoreClient(EngineClient):
    """The front's end of the core wire; subclasses start the core and watch its process."""

    def __init__(self, name: str, liveness_s: float | None = None,
                 startup_timeout_s: float | None = None) -> None:
        self.name = name
        self.liveness_s = liveness_s or envs.engine_liveness_s()
        self.heartbeat_s = min(1.0, self.liveness_s / 4)
        self.startup_timeout_s = startup_timeout_s or envs.replica_startup_timeout_s()
        self.latest_stats: EngineStats | None = None
        self._wire = Wire()
        self._context: zmq.asyncio.Context | None = None
        self._in: zmq.asyncio.Socket | None = None
        self._out: zmq.asyncio.Socket | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stats_waiters: collections.deque[asyncio.Future] = collections.deque()
        self._reader: asyncio.Task | None = None
        self._dead_error: BaseException | None = None
        self._closed = False

    # -- hooks ----------------------------------------------------------------------------------
    def _core_exit_cause(self) -> str | None:
        """Why the core is gone if it is known to be gone (process exited, actor died), else None."""
        return None

    def _on_dead(self) -> None:
        """Make sure a core declared dead (perhaps only hung) is really stopped."""

    # -- start-up ---------------------------------------------------------------------------------
    def _connect(self, input_address: str, output_address: str, keys=None) -> None:
        """`keys` (cluster/core/curve.py): the core is a CURVE server that admits only this client."""
        self._context = zmq.asyncio.Context()
        self._in = self._context.socket(zmq.PUSH)
        self._out = self._context.socket(zmq.PULL)
        for sock, address in ((self._in, input_address), (self._out, output_address)):
            if keys is not None:
                from pagedray.cluster.core.curve import secure_client
                secure_client(sock, keys)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)

    async def _await_info(self) -> None:
        """The core's first frame: INFO once its model is loaded, or FATAL with the reason."""
        recv = asyncio.ensure_future(self._out.recv_multipart())
        deadline = asyncio.get_running_loop().time() + self.startup_timeout_s
        while not recv.done():
            await asyncio.wait([recv], timeout=min(0.25, self.startup_timeout_s))
            cause = self._core_exit_cause()
            if cause is not None and not recv.done():
                recv.cancel()
                raise EngineDeadError(f"engine {self.name} failed to start: {cause}")
            if asyncio.get_running_loop().time() > deadline and not recv.done():
                recv.cancel()
                raise EngineDeadError(f"engine {self.name} was not ready within {self.startup_timeout_s:g} s")
        kind, payload = recv.result()[:2]
        if kind == Wire.FATAL:
            failure = self._wire.failure.decode(payload)
            if failure.type_name == "ValueError":   # a bad model or setting: the caller's to fix
                raise ValueError(failure.message)
            raise EngineDeadError(f"engine {self.name} failed to start: {failure.type_name}: {failure.message}")
        self.info: EngineInfo = self._wire.info.decode(payload)
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    # -- the reader -------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while True:
            try:
                frames = await asyncio.wait_for(self._out.recv_multipart(copy=False), self.liveness_s)
            except asyncio.TimeoutError:
                cause = self._core_exit_cause() or (
                    f"sent nothing for {self.liveness_s:g} s (hung or stopped; heartbeat every "
                    f"{self.heartbeat_s:g} s)")
                self._die(cause)
                return
            except (zmq.ZMQError, asyncio.CancelledError):
                return     # closed by shutdown
            # Then whatever else is queued, without a trip through the event loop each: that trip
            # doubled the reader's CPU per frame (docs/perf-notes/history.md, transport).
            drained = 0
            while frames is not None and self._dispatch(frames) and drained < self.DRAIN_MAX:
                frames, drained = self._recv_now(), drained + 1
            if self._dead_error is not None:
                return

    DRAIN_MAX = 256

    def _recv_now(self) -> list | None:
        try:
            frames = self._out.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            return frames.result() if asyncio.isfuture(frames) else frames
        except zmq.Again:
            return None

    def _dispatch(self, frames: list) -> bool:
        """Handle one frame; False when the core reported its failure."""
        kind, payload = frames[0].bytes, frames[1].buffer if len(frames) > 1 else b""
        if kind == Wire.OUTPUTS:
            outputs = self._wire.outputs.decode(payload)
            if outputs.stats is not None:
                self.latest_stats = outputs.stats
            if outputs.outputs:
                self._queue.put_nowait(outputs)
        elif kind == Wire.STATS:
            self.latest_stats = self._wire.stats.decode(payload)
            if self._stats_waiters:
                waiter = self._stats_waiters.popleft()
                if not waiter.done():
                    waiter.set_result(self.latest_stats)
        elif kind == Wire.FATAL:
            failure = self._wire.failure.decode(payload)
            self._die(f"the engine core failed: {failure.type_name}: {failure.message}")
            return False
        return True

    def _die(self, cause: str) -> None:
        if self._dead_error is not None or self._closed:
            return
        self._dead_error = EngineDeadError(f"engine {self.name}: {cause}")
        logger.error("%s", self._dead_error)
        self._queue.put_nowait(_DEAD)
        for waiter in self._stats_waiters:
            if not waiter.done():
                waiter.set_exception(self._dead_error)
        self._stats_waiters.clear()
        self._on_dead()

    def _destroy_context(self) -> None:
        """Close the sockets and the context now: left to garbage collection, `Context.term` can wait
        forever on sockets it has not closed yet (a test run that never exits)."""
        if self._context is not None and not self._context.closed:
            self._context.destroy(linger=0)

    # -- EngineClient ---------------------------------------------------------------------------------
    @property
    def dead_error(self) -> BaseException | None:
        return self._dead_error

    def _check_alive(self) -> None:
        if self._dead_error is not None:
            raise self._dead_error
        if self._closed or self._reader is None:
            raise EngineDeadError(f"engine {self.name} is not running")

    async def add(self, requests: list[CoreRequest]) -> None:
        self._check_alive()
        payload = self._wire.encode(requests)   # TypeError here for what cannot be encoded
        self._in.send_multipart([Wire.ADD, payload], flags=zmq.NOBLOCK, copy=False)

    async def abort(self, request_ids: list[str]) -> None:
        if self._dead_error is not None or self._closed or not request_ids:
            return     # a dead core holds nothing any more
        self._in.send_multipart([Wire.ABORT, self._wire.encode(list(request_ids))], flags=zmq.NOBLOCK)

    async def get_stats(self) -> EngineStats:
        self._check_alive()
        waiter = asyncio.get_running_loop().create_future()
        self._stats_waiters.append(waiter)
        self._in.send_multipart([Wire.STATS, b""], flags=zmq.NOBLOCK)
        return await asyncio.wait_for(waiter, self.liveness_s)

    async def outputs(self) -> AsyncIterator[CoreOutputs]:
        while True:
            item = await self._queue.get()
            if item is _DEAD:
                self._queue.put_nowait(_DEAD)   # every later reader sees the death too
                raise self._dead_error
            yield item

    async def _close_wire(self) -> None:
        """Ask the core to stop (if it still listens), then close this end."""
        self._closed = True
        if self._in is not None and self._dead_error is None and self._reader is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._in.send_multipart([Wire.SHUTDOWN, b""], flags=zmq.NOBLOCK)
                await asyncio.sleep(0)   # let the send go out before LINGER 0 drops it
        if self._reader is not None:
            self._reader.cancel()
        for waiter in self._stats_waiters:
            if not waiter.done():
                waiter.set_exception(EngineDeadError(f"engine {self.name} was shut down"))
        if self._dead_error is None:
            self._dead_error = EngineDeadError(f"engine {self.name} was shut down")
            self._queue.put_nowait(_DEAD)


class ProcessClient(ZmqCoreClient):
    """An engine core in a spawned subprocess of this one (the embedded server's local backend)."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any] | None = None, *, name: str = "local-0",
                 liveness_s: float | None = None, startup_timeout_s: float | None = None,
                 core_factory: str = DEFAULT_CORE_FACTORY, num_threads: int | None = None) -> None:
        super().__init__(name, liveness_s, startup_timeout_s)
        self.model = model
        self.engine_kwargs = dict(engine_kwargs or {})
        self.core_factory = core_factory
        self.num_threads = num_threads
        self.process: multiprocessing.process.BaseProcess | None = None
        self._ipc_dir: str | None = None
        self._sentinel_watched = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:   # cancellation included: what was opened is closed, the process reaped
            await self.shutdown()
            raise

    async def _start(self) -> None:
        from pagedray.models.registry import ModelRegistry
        self._ipc_dir = make_ipc_dir("core")
        startup = CoreStartup(self.model, self.engine_kwargs, f"ipc://{self._ipc_dir}/in",
                              f"ipc://{self._ipc_dir}/out", self.heartbeat_s, self.core_factory,
                              num_threads=self._threads())
        ctx = multiprocessing.get_context("spawn")
        # daemon: multiprocessing also kills it when this process exits normally.
        self.process = ctx.Process(target=run_engine_core, name=f"pagedray-core-{self.name}", daemon=True,
                                   args=(self._wire.encode(startup), os.getpid(), ModelRegistry.out_of_tree()))
        self.process.start()
        loop = asyncio.get_running_loop()
        loop.add_reader(self.process.sentinel, self._on_exit)
        self._sentinel_watched = True
        self._connect(startup.input_address, startup.output_address)
        await self._await_info()

    def _threads(self) -> int | None:
        """A CPU engine leaves one core to this process: its torch threads otherwise spin at
        their barriers while the front runs (2-core box: 105 against 791 tokens/s at one stream,
        docs/perf-notes/history.md). A GPU engine keeps torch's default."""
        if envs.engine_threads():
            return envs.engine_threads()
        if self.num_threads or str(self.engine_kwargs.get("device", "auto")).startswith("cuda"):
            return self.num_threads
        return max(1, (os.cpu_count() or 2) - 1)

    def _core_exit_cause(self) -> str | None:
        if self.process is None or self.process.exitcode is None:
            return None
        code = self.process.exitcode
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        return f"engine core process {self.process.pid} exited ({how})"

    def _on_exit(self) -> None:
        self._unwatch()
        # The sentinel closes as the process exits, a moment before it can be reaped.
        self.process.join(1.0)
        self._remove_ipc_dir()   # nobody binds them any more (a dead client may never be shut down)
        if self._reader is not None:   # during start-up, _await_info reports it
            self._die(self._core_exit_cause() or "engine core process exited")

    def _unwatch(self) -> None:
        if self._sentinel_watched:
            asyncio.get_running_loop().remove_reader(self.process.sentinel)
            self._sentinel_watched = False

    def _on_dead(self) -> None:
        if self.process is not None and self.process.exitcode is None:
            self.process.kill()    # hung: it will never finish its requests; free its memory

    async def shutdown(self) -> None:
        if self._closed:
            return
        try:
            await self._close_wire()
            if self.process is not None and self.process.pid is not None:
                self._unwatch()
                grace_s = 10.0 if self._reader is not None else 0.0   # one still starting is not listening
                await asyncio.get_running_loop().run_in_executor(None, self._reap, grace_s)
        finally:   # even when cancelled: an undestroyed context can block garbage collection for good
            self._destroy_context()
            self._remove_ipc_dir()

    def _remove_ipc_dir(self) -> None:
        if self._ipc_dir is not None:
            shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def _reap(self, grace_s: float = 10.0) -> None:
        """SHUTDOWN was sent: give the core `grace_s` to stop, then SIGTERM, then SIGKILL."""
        self.process.join(grace_s)
        if self.process.exitcode is None:
            self.process.terminate()
            self.process.join(5.0)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
