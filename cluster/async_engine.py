"""AsyncEngine: the synchronous LLMEngine behind an asyncio interface, for serving.

One background thread owns the engine and is the only thread that calls it, so the
engine needs no lock of its own. The event loop talks to that thread through a
command inbox (add, abort, stats: applied in order before the next step) and gets
outputs back through `loop.call_soon_threadsafe`. Engine outputs are cumulative, so
each request keeps only its latest output ("latest wins"): a slow reader never
piles up a queue, and `DeltaTracker` turns cumulative outputs into stream deltas.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

from pagedray.cluster.core.messages import EngineStats
from pagedray.cluster.serving.engine_client import EngineDeadError
from pagedray.cluster.metrics import ServingMetrics
from pagedray.cluster.outputs import CompletionOutput, RequestOutput
from pagedray.workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "DeltaTracker", "EngineDeadError", "QueueFullError"]


class QueueFullError(RuntimeError):
    """The admission queue is full: retry later (gRPC RESOURCE_EXHAUSTED)."""


class _Stream:
    """Per-request state; touched only on the event loop."""

    def __init__(self, request_id: str, n: int) -> None:
        self.request_id = request_id
        self.n = n
        self.latest: RequestOutput | None = None
        self.error: BaseException | None = None
        self.event = asyncio.Event()
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.done = False

    def push(self, out: RequestOutput) -> None:
        self.latest = out
        self.event.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.event.set()


class AsyncEngine:
    """Owns an LLMEngine; `generate()` is an async iterator of cumulative RequestOutputs."""

    def __init__(self, engine: Any, *, max_pending_requests: int = 1024,
                 metrics: ServingMetrics | None = None) -> None:
        if max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be >= 1, got {max_pending_requests}")
        self.engine = engine
        self.max_pending_requests = max_pending_requests
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.metrics.bind(lambda: self.stats_snapshot)
        # Read by metrics scrapes; refreshed by the engine thread after every step.
        self.stats_snapshot: EngineStats | None = engine.get_stats()
        self.dead_error: BaseException | None = None
        self._streams: dict[str, _Stream] = {}
        self._inbox: list[tuple] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dead_callbacks: list[Callable[[BaseException], None]] = []

    @classmethod
    def from_kwargs(cls, model: str, *, max_pending_requests: int = 1024, **kwargs) -> "AsyncEngine":
        """Build the LLMEngine with LLM(...)'s keywords (loads the model: can take a while)."""
        from pagedray.cluster.engine import LLMEngine
        return cls(LLMEngine.from_kwargs(model, **kwargs), max_pending_requests=max_pending_requests)

    # -- what the server reads -------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def tensor_parallel_size(self) -> int:
        config = getattr(self.engine, "config", None)
        return config.parallel.tensor_parallel_size if config is not None else 1

    @property
    def is_healthy(self) -> bool:
        return self.dead_error is None and not self._stopping

    @property
    def num_pending(self) -> int:
        """Requests admitted and not finished (running + waiting in the engine)."""
        return len(self._streams)

    def on_dead(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` on the event loop when the engine fails."""
        self._dead_callbacks.append(callback)

    # -- requests ----------------------------------------------------------------
    async def generate(self, prompt: str | dict, params: SamplingParams | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs until the request finishes.

        Raises ValueError (bad input, naming the field), QueueFullError, EngineDeadError.
        Closing or cancelling the iterator early aborts the request and frees its blocks.
        """
        params = params if params is not None else SamplingParams()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        self._check_accepting(request_id)
        stream = _Stream(request_id, params.n)
        self._streams[request_id] = stream
        added = self._loop.create_future()
        self._submit(("add", request_id, prompt, params, added))
        finished = False
        try:
            try:
                await added
            except Exception:
                finished = True  # rejected: the engine holds nothing for it
                raise
            while True:
                await stream.event.wait()
                stream.event.clear()
                if stream.error is not None:
                    finished = True  # the engine already dropped it
                    raise stream.error
                out = stream.latest
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.dead_error is None:
                self._submit(("abort", request_id))

    def _check_accepting(self, request_id: str) -> None:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine has failed: {self.dead_error}")
        if self._stopping:
            raise EngineDeadError("the engine is shutting down")
        self._ensure_started()
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in flight")
        if len(self._streams) >= self.max_pending_requests:
            raise QueueFullError(f"admission queue full: {len(self._streams)} requests pending "
                                 f"(max_pending_requests={self.max_pending_requests})")

    async def abort(self, request_id: str) -> None:
        """Stop a request: its stream ends with finish_reason "abort"; blocks are freed."""
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self._submit(("abort", request_id))
        stream.push(_aborted(stream))

    async def get_stats(self) -> EngineStats:
        """Stats taken after every command sent before this call (aborts included)."""
        if self.dead_error is not None or self._stopping:
            raise EngineDeadError("the engine is not running")
        self._ensure_started()
        future = self._loop.create_future()
        self._submit(("stats", future))
        return await future

    async def shutdown(self) -> None:
        """Stop the loop thread; pending requests get EngineDeadError."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        error = EngineDeadError("the engine was shut down")
        self._fail_inbox(error)
        for stream in list(self._streams.values()):
            stream.fail(error)
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            await asyncio.to_thread(shutdown)

    # -- the engine thread ----------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedray-engine", daemon=True)
        self._thread.start()

    def _submit(self, command: tuple) -> None:
        with self._wakeup:
            self._inbox.append(command)
            self._wakeup.notify()

    def _run(self) -> None:
        engine = self.engine
        busy = False
        while True:
            with self._wakeup:
                while not self._inbox and not busy and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                commands, self._inbox = self._inbox, []
            applied = 0
            try:
                for command in commands:
                    self._apply(command)
                    applied += 1
                outputs = engine.step() if engine.has_unfinished_requests() else []
                busy = engine.has_unfinished_requests()
                self.stats_snapshot = engine.get_stats()
            except BaseException as exc:  # noqa: BLE001 - any failure kills the engine
                logger.exception("engine step failed; the engine is dead")
                with self._wakeup:  # unread commands (the failing one too) are answered by _die
                    self._inbox = commands[applied:] + self._inbox
                self._call_soon(self._die, exc)
                return
            if outputs:
                self._call_soon(self._deliver, outputs, time.monotonic())
            self.metrics.on_step(self.stats_snapshot)

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params, future = command
            try:
                self.engine.add_request(request_id, prompt, params)
            except EngineDeadError:
                raise
            except Exception as exc:  # bad input (ValueError) fails this request, not the engine
                self._call_soon(_settle, future, exc)
            else:
                self._call_soon(_settle, future, None)
        elif kind == "abort":
            self.engine.abort_request(command[1])
        elif kind == "stats":
            self._call_soon(_settle, command[1], None, self.engine.get_stats())

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # -- back on the event loop -------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput], when: float) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None or stream.done:
                continue  # cancelled or aborted meanwhile; its abort is on the way
            if stream.first_token_time is None and any(c.token_ids for c in out.outputs):
                stream.first_token_time = when
                self.metrics.observe_ttft(when - stream.arrival)
            if out.finished:
                stream.done = True
                self._observe_finished(stream, out, when)
            stream.push(out)

    def _observe_finished(self, stream: _Stream, out: RequestOutput, when: float) -> None:
        longest = max(len(c.token_ids) for c in out.outputs)
        tpot = None
        if stream.first_token_time is not None and longest > 1:
            tpot = (when - stream.first_token_time) / (longest - 1)
        for c in out.outputs:
            self.metrics.observe_finished(c.finish_reason or "abort")
        if tpot is not None:
            self.metrics.observe_tpot(tpot)
        self.metrics.observe_e2e(when - stream.arrival)

    def _die(self, exc: BaseException) -> None:
        self.dead_error = exc
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"the engine has failed: {exc}")
        self._fail_inbox(error)
        for stream in list(self._streams.values()):
            stream.fail(error)
        for callback in self._dead_callbacks:
            callback(error)

    def _fail_inbox(self, error: BaseException) -> None:
        """The engine thread is gone: answer the commands it will never read."""
        with self._wakeup:
            commands, self._inbox = self._inbox, []
        for command in commands:
            future = command[4] if command[0] == "add" else command[1] if command[0] == "stats" else None
            if future is not None:
                _settle(future, error)


def _settle(future: asyncio.Future, error: BaseException | None, result: Any = None) -> None:
    if future.done():  # the waiter was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _aborted(stream: _Stream) -> RequestOutput:
    """The final output of an aborted request: what it had, with finish_reason "abort"."""
    stream.done = True
    last = stream.latest
    if last is None:
        completions = [CompletionOutput(i, "", [], None, "abort") for i in range(stream.n)]
        return RequestOutput(stream.request_id, None, [], completions, finished=True)
    completions = [c if c.finish_reason else dataclasses.replace(c, finish_reason="abort")
                   for c in last.outputs]
    return dataclasses.replace(last, outputs=completions, finished=True)


class DeltaTracker:
    """Turns one request's cumulative outputs into deltas for streaming.

    A completion appears in a delta only when it advanced (new tokens or text) or just
    finished; its text, token_ids and logprobs hold only what is new since the last delta.
    """

    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, int, bool]] = {}  # index -> (text chars, tokens, finished)

    def delta(self, out: RequestOutput) -> RequestOutput:
        changed = []
        for c in out.outputs:
            chars, tokens, was_finished = self._sent.get(c.index, (0, 0, False))
            if was_finished:
                continue
            new_text, new_tokens = c.text[chars:], c.token_ids[tokens:]
            if not new_text and not new_tokens and c.finish_reason is None:
                continue
            logprobs = c.logprobs[tokens:] if c.logprobs is not None else None
            changed.append(CompletionOutput(c.index, new_text, new_tokens, logprobs, c.finish_reason))
            self._sent[c.index] = (len(c.text), len(c.token_ids), c.finish_reason is not None)
        return dataclasses.replace(out, outputs=changed)
