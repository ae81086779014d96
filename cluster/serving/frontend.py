"""Frontend: the serving side of every request (vLLM's AsyncLLM is the model), over engine clients.

Per request, once: request id, validation (ValueError before any work), tokenization (off the event
loop, on a thread with its own tokenizer copy), routing (the Router picks a client), then the
client's per-step deltas through one OutputProcessor (detokenization, stop strings, n > 1) into a
stream. One pump task per client reads its `outputs()`; a stream wakes once per engine step and
builds its message then, so a slow reader gets several steps' tokens in one message and a fast one
one message per step, never a token held back past the step that made it.

Migration: when a client dies (`outputs()` raises EngineDeadError), every request it held resumes
on a ready client from its prompt plus the tokens produced so far, same params (a seeded request
draws by output position, so it continues its own stream): the stream sees no gap, no duplicate,
no error. A request fails with EngineDeadError (gRPC UNAVAILABLE), naming the cause, only when no
client is left (and none is being started) or after `max_migrations` moves. A dead client is
replaced through `client_factory` when one is given.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from pagedray.cluster.core.messages import CoreOutputs, CoreRequest, EngineInfo, EngineStats, sum_stats
from pagedray.cluster.serving.metrics import ServingMetrics
from pagedray.cluster.outputs import RequestOutput
from pagedray.cluster.serving.engine_client import EngineClient
from pagedray.common.errors import EngineDeadError
from pagedray.cluster.serving.input_processor import InputProcessor, load_tokenizer
from pagedray.cluster.serving.limits import QueueFullError
from pagedray.cluster.serving.migration import resume_requests
from pagedray.cluster.serving.output_processor import OutputProcessor, RequestState
from pagedray.cluster.serving.router import Router
from pagedray.common.quoting import clip, quote
from pagedray.cluster.serving.lora_registry import LoRARegistry
from pagedray.common.lora import LoRARequest
from pagedray.common.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["Frontend", "QueueFullError", "EngineDeadError"]


@dataclass
class _Request:
    """One request in flight: where it runs and what its stream has to read.

    The client's request_id names it to the client only: the engine side (output processor,
    router, cores) knows it by an id the frontend makes (`core.request_id`), so no client id can
    collide with an id the engine derives (an n > 1 request's `completion_id`s)."""
    client_id: str
    state: RequestState               # keyed by core.request_id
    core: CoreRequest                 # as first sent (params with the engine's defaults filled)
    client: EngineClient | None = None
    core_ids: list[str] = field(default_factory=list)   # the ids the current client knows it by
    migrations: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)
    error: BaseException | None = None
    ttft_seen: bool = False


class Frontend:
    def __init__(self, router: Router | None = None, *, tokenizer=None,
                 client_factory: Callable[[], Awaitable[EngineClient]] | None = None,
                 max_migrations: int = 2, max_pending_requests: int = 1024,
                 metrics: ServingMetrics | None = None) -> None:
        if max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {max_migrations}")
        if max_pending_requests < 1:
            raise ValueError(f"max_pending_requests must be >= 1, got {max_pending_requests}")
        self.router = router if router is not None else Router(metrics=metrics)
        self.metrics = self.router.metrics
        self.metrics.bind(lambda: self.stats_snapshot)
        self.client_factory = client_factory
        self.max_migrations = max_migrations
        self.max_pending_requests = max_pending_requests
        self._tokenizer = tokenizer
        self.info: EngineInfo | None = None
        self.input_processor: InputProcessor | None = None
        self.output_processor: OutputProcessor | None = None
        self._requests: dict[str, _Request] = {}             # by the client's request_id
        self._by_core: dict[str, _Request] = {}              # by the frontend-made core id
        self._by_core_id: dict[str, tuple[str, int]] = {}   # migrated completion id -> (core id, index)
        self._next_core = 0
        self._core_prefix = f"f{uuid.uuid4().hex[:8]}-"
        self._admitting = 0                                  # admitted, still tokenizing
        self._pumps: dict[str, asyncio.Task] = {}
        self._stats: dict[str, EngineStats] = {}
        self._parked: list[_Request] = []                    # waiting for a replacement client
        self._replacing: set[asyncio.Task] = set()
        self._tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._tokenize_copy = None
        self._generated = 0
        self._closed = False
        self.loras = LoRARegistry()   # served adapters by name (HTTP's model, gRPC's adapter field)
        self.router.on_change(self._attach_pumps)
        if self.router.replicas:
            self._attach_pumps()

    @classmethod
    async def start_with(cls, clients: list[EngineClient], **kwargs) -> "Frontend":
        """A frontend over `clients`, each started here; if one fails to start, all are shut down."""
        results = await asyncio.gather(*[c.start() for c in clients], return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*[c.shutdown() for c in clients], return_exceptions=True)
            raise failed[0]
        frontend = cls(**kwargs)
        for client in clients:
            frontend.add_client(client)
        return frontend

    # -- what entry points read -------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def is_healthy(self) -> bool:
        """A replica is ready, or one replacing a dead one is starting (requests wait for it)."""
        return not self._closed and (self.router.is_healthy or bool(self._replacing))

    @property
    def num_ready_replicas(self) -> int:
        return self.router.num_ready

    @property
    def num_pending(self) -> int:
        return len(self._requests)

    @property
    def stats_snapshot(self) -> EngineStats | None:
        stats = [self._stats[r.name] for r in self.router.replicas if r.name in self._stats]
        return sum_stats(stats) if stats else None

    async def get_stats(self) -> EngineStats:
        """The ready replicas' stats, summed (all zero when none is ready)."""
        stats = await asyncio.gather(*[c.get_stats() for c in self.router.routable()])
        return sum_stats(list(stats)) if stats else EngineStats()

    # -- clients ----------------------------------------------------------------------------
    def add_client(self, client: EngineClient) -> None:
        """Serve through a started client (the Router learns it too; its pump starts)."""
        self.router.add_replica(client)

    def _attach_pumps(self) -> None:
        """Router changed: the first client sets the model info; every live client gets a pump."""
        for client in self.router.replicas:
            if self.info is None:
                self._set_info(client.info)
            if client.name not in self._pumps and client.is_healthy:
                self._pumps[client.name] = asyncio.get_running_loop().create_task(self._pump(client))
                self._spawn(self._first_stats(client))
        if self._parked and self.router.is_healthy:
            parked, self._parked = self._parked, []
            for req in parked:
                self._place(req, cause=None)

    def _set_info(self, info: EngineInfo) -> None:
        self.info = info
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(info.model, info.tokenizer)
        self.input_processor = InputProcessor(self._tokenizer, info)
        self.output_processor = OutputProcessor(self._tokenizer)
        self.loras.max_lora_rank = info.max_lora_rank

    async def _first_stats(self, client: EngineClient) -> None:
        """Stats before the first step, for metrics scrapes."""
        stats = await client.get_stats()
        self._stats.setdefault(client.name, stats)

    async def _pump(self, client: EngineClient) -> None:
        try:
            async for batch in client.outputs():
                self._apply(client, batch)
        except EngineDeadError as exc:
            self._on_client_dead(client, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in our handling must not strand the requests
            logger.exception("output pump of %s failed", client.name)
            self._on_client_dead(client, exc)
        finally:
            self._pumps.pop(client.name, None)

    # -- one engine step's deltas ---------------------------------------------------------------
    def _apply(self, client: EngineClient, batch: CoreOutputs) -> None:
        if batch.stats is not None:
            self._stats[client.name] = batch.stats
        outputs = batch.outputs
        if self._by_core_id:
            for out in outputs:
                alias = self._by_core_id.get(out.request_id)
                if alias is not None:
                    out.request_id, out.index = alias
        processed = self.output_processor.process_outputs(outputs)
        if processed.reqs_to_abort:
            self._spawn(client.abort(processed.reqs_to_abort))
        now = time.monotonic()
        for state in processed.advanced:
            req = self._by_core.get(state.request_id)
            if req is None:
                continue
            self._observe(req, state, now)
            if state.error is not None:
                req.error = ValueError(state.error)
            req.event.set()
        new_tokens = sum(len(o.new_token_ids) for o in outputs)
        if new_tokens:
            self._generated += new_tokens
            self.metrics.throughput.record(self._generated, now)
            for out in outputs:
                self.router.progress(out.request_id, len(out.new_token_ids))

    def _observe(self, req: _Request, state: RequestState, now: float) -> None:
        """TTFT once, at the first token; TPOT and end-to-end once, at the finish."""
        if state.first_token_time is not None and not req.ttft_seen:
            req.ttft_seen = True
            self.metrics.observe_ttft(now - state.arrival_time)
        if not state.finished:
            return
        longest = max(len(c.token_ids) for c in state.completions)
        if state.first_token_time is not None and longest > 1:
            self.metrics.observe_tpot((now - state.first_token_time) / (longest - 1))
        for c in state.completions:
            self.metrics.observe_finished(c.finish_reason or "abort")
        self.metrics.observe_e2e(now - state.arrival_time)

    # -- requests -----------------------------------------------------------------------------
    async def generate(self, prompt: str | dict, params: SamplingParams | None = None,
                       request_id: str | None = None, *, final_only: bool = False,
                       lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Delta outputs until the request finishes (each holds only what is new); with `final_only`,
        one cumulative output when it finishes (unary replies: the request state already holds it).

        Raises ValueError (bad input), QueueFullError, EngineDeadError (no replica, or the request
        could not be moved off a failed one). Closing the iterator early aborts the request.
        """
        req = await self._admit(prompt, params, request_id, lora_request)
        rid = req.client_id
        try:
            while True:
                await req.event.wait()
                req.event.clear()
                if req.error is not None:
                    raise req.error
                if final_only:
                    if req.state.finished:
                        yield self._named(req.state.make_output(delta=False), rid)
                        return
                    continue
                out = self._named(req.state.make_output(delta=True), rid)
                if out.outputs or out.finished:
                    yield out
                if out.finished:
                    return
        finally:
            self._forget(req, abort=not req.state.finished)
            if self._requests.get(rid) is req:
                del self._requests[rid]
            self._by_core.pop(req.core.request_id, None)

    @staticmethod
    def _named(out: RequestOutput, client_id: str) -> RequestOutput:
        out.request_id = client_id
        return out

    async def _admit(self, prompt, params, request_id, lora_request=None) -> _Request:
        if self._closed:
            raise EngineDeadError("the frontend is shut down")
        if self.info is None:
            raise EngineDeadError("no replica has been added yet")
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        if request_id in self._requests:
            raise ValueError(f"request_id {quote(request_id)} is already in flight")
        # Those still tokenizing count too: the limit holds however many arrive at once.
        if len(self._requests) + self._admitting >= self.max_pending_requests:
            raise QueueFullError(f"{len(self._requests) + self._admitting} requests in flight: at "
                                 f"max_pending_requests={self.max_pending_requests}, retry later")
        params = (params or SamplingParams()).clone()
        self._admitting += 1
        try:
            text, token_ids = await self._tokenize(prompt)
        finally:
            self._admitting -= 1
        core_id = f"{self._core_prefix}{self._next_core}"
        self._next_core += 1
        core = self.input_processor.make_request(core_id, token_ids, params, time.time(), lora_request)
        if request_id in self._requests:   # taken while we tokenized
            raise ValueError(f"request_id {quote(request_id)} is already in flight")
        state = self.output_processor.add_request(core_id, text, token_ids, params)
        req = _Request(request_id, state, core)
        self._requests[request_id] = req
        self._by_core[core_id] = req
        try:
            self._place(req, cause=None, raise_errors=True)
        except BaseException:
            del self._requests[request_id]
            del self._by_core[core_id]
            self.output_processor.abort_requests([core_id])
            raise
        return req

    async def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        if not isinstance(prompt, str):
            return self.input_processor.tokenize(prompt)
        self.input_processor.check_text_size(prompt)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, self._tokenize_on_thread, prompt)

    def _tokenize_on_thread(self, prompt: str) -> tuple[str | None, list[int]]:
        # Its own copy: a Rust tokenizer used from two threads at once can fail ("Already borrowed").
        if self._tokenize_copy is None:
            self._tokenize_copy = InputProcessor(copy.deepcopy(self._tokenizer), self.info)
        return self._tokenize_copy.tokenize(prompt)

    def _place(self, req: _Request, cause: BaseException | None, raise_errors: bool = False) -> None:
        """Send the request (first time, or the rest of it after a move) to a ready client."""
        try:
            client = self.router.choose(req.core.prompt_token_ids, lora_request=req.core.lora_request)
        except EngineDeadError as exc:
            if self._replacing or (cause is not None and self.router.replaces_dead is not None
                                   and self.router.replaces_dead()):
                self._park(req)    # a replacement is starting (ours, or the autoscaler's): resume there
                return
            error = exc if cause is None else EngineDeadError(f"{exc}; the request's replica failed: {cause}")
            if raise_errors:
                raise error
            self._fail(req, error)
            return
        requests = self._core_requests(req)
        req.client, req.core_ids = client, [r.request_id for r in requests]
        state = req.state
        weight = sum(len(r.prompt_token_ids) + r.params.max_tokens - len(r.output_token_ids) for r in requests)
        self.router.assign(state.request_id, client, weight)
        self._spawn(self._send(client, req, requests))

    async def _send(self, client: EngineClient, req: _Request, requests: list[CoreRequest]) -> None:
        try:
            await client.add(requests)
        except EngineDeadError:
            pass   # its pump sees the death and moves the request
        except Exception as exc:   # noqa: BLE001 - not handed over: fail it now, never leave it in flight
            logger.warning("request %s could not be handed to %s: %s", quote(req.client_id), client.name, exc)
            self._fail(req, EngineDeadError(f"the request could not be handed to its engine "
                                            f"({type(exc).__name__}: {clip(str(exc), 200)})"))

    def _core_requests(self, req: _Request) -> list[CoreRequest]:
        """What to send: the request whole, or (after a move) the rest of each unfinished completion."""
        if req.migrations == 0:
            return [req.core]
        requests = resume_requests(req.core, req.state)
        if len(req.state.completions) > 1:
            for r, c in zip(requests, [c for c in req.state.completions if not c.finished]):
                self._by_core_id[r.request_id] = (req.core.request_id, c.index)
        return requests

    def _on_client_dead(self, client: EngineClient, error: BaseException) -> None:
        logger.error("replica %s failed (%s): moving its requests", client.name, error)
        self._stats.pop(client.name, None)
        if self.client_factory is not None and not self._closed:
            task = asyncio.get_running_loop().create_task(self._replace(client.name))
            self._replacing.add(task)
            task.add_done_callback(self._replaced)
        self.router.drop(client)
        for req in [r for r in self._requests.values() if r.client is client and not r.state.finished]:
            self._migrate(req, error)
        self._spawn(client.shutdown())

    PARK_TIMEOUT_S = 600.0   # a request moved off a dead replica waits this long for its replacement

    def _park(self, req: _Request) -> None:
        self._parked.append(req)

        def expire() -> None:
            if req in self._parked:
                self._parked.remove(req)
                self._fail(req, EngineDeadError(f"request {quote(req.client_id)}: no replica became ready "
                                                f"within {self.PARK_TIMEOUT_S:g} s after its replica failed"))
        asyncio.get_running_loop().call_later(self.PARK_TIMEOUT_S, expire)

    def _migrate(self, req: _Request, error: BaseException) -> None:
        self._unalias(req)
        self.router.release(req.state.request_id)
        req.client = None
        if req.migrations >= self.max_migrations:
            self._fail(req, EngineDeadError(
                f"request {quote(req.client_id)} failed: its replica failed ({error}) and it was already "
                f"moved {req.migrations} time(s), the limit (max_migrations={self.max_migrations})"))
            return
        req.migrations += 1
        self._place(req, cause=error)

    async def _replace(self, dead_name: str) -> None:
        try:
            client = await self.client_factory()
            await client.start()
        except Exception as exc:
            logger.error("replacing replica %s failed: %s", dead_name, exc)
            parked, self._parked = self._parked, []
            for req in parked:
                self._fail(req, EngineDeadError(f"no replica left: replacing {dead_name} failed: {exc}"))
            return
        if self._closed:
            await client.shutdown()
            return
        self.add_client(client)

    def _replaced(self, task: asyncio.Task) -> None:
        self._replacing.discard(task)
        if not self._closed:
            self.router.notify()   # health follows: SERVING only while a replica is ready or starting

    def _fail(self, req: _Request, error: BaseException) -> None:
        req.error = error
        req.event.set()

    def _forget(self, req: _Request, abort: bool) -> None:
        """The stream ended: free the request everywhere (abort it on its client if unfinished)."""
        rid = req.state.request_id
        if abort:
            self.output_processor.abort_requests([rid])
            if req.client is not None and req.client.is_healthy:
                self._spawn(self._abort_on(req.client, list(req.core_ids)))
        if req in self._parked:
            self._parked.remove(req)
        self._unalias(req)
        self.router.release(rid)

    async def _abort_on(self, client: EngineClient, core_ids: list[str]) -> None:
        """Abort, then refresh the client's stats: an idle core sends no step to carry them."""
        await client.abort(core_ids)
        if client.is_healthy:
            self._stats[client.name] = await client.get_stats()

    def _unalias(self, req: _Request) -> None:
        for cid in req.core_ids:
            self._by_core_id.pop(cid, None)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(_log_failure)

    async def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self._forget(req, abort=True)   # its stream ends with an "abort" finish
            req.event.set()

    async def shutdown(self) -> None:
        self._closed = True
        for task in list(self._replacing):
            task.cancel()
        for task in list(self._pumps.values()):
            task.cancel()
        await asyncio.gather(*self._pumps.values(), *self._replacing, return_exceptions=True)
        await self.router.shutdown()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("frontend background call failed: %s", task.exception())
