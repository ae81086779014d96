"""EngineCore: the step loop (schedule -> execute -> update -> emit) over token ids, no tokenizer.

`add` takes validated `CoreRequest`s, `step` returns one `CoreOutputs` batch of deltas (the new
token ids, logprobs and finish of each completion that advanced); nothing is cumulative, so a step
costs the same at token 1 and token 4000. Callers: `LLMEngine` (offline, in-process), the
in-process client (a thread), and the core's own process loop (a subprocess or Ray actor).

n > 1: a request runs as n sequences. Completion 0 prefills the prompt; when it has its first
token, completions 1..n-1 are forked from it (`Scheduler.fork_request`) at prompt length - 1,
sharing every block of the prompt and copying only the block of the last prompt token, which each
recomputes to draw its own first token.

Pipeline parallelism: the core keeps up to pipeline_parallel_size steps in flight (the executor
returns when a step is submitted; stage 0 runs step N+1 while stage 1 runs step N). Each `step()`
fills the pipeline with steps built from requests not already in flight, then reads the oldest.

Resume: a request with `output_token_ids` (migrated from a failed core) starts as a preempted one
would: prompt + those tokens are recomputed and sampling continues at output position
len(output_token_ids), so a seeded request continues its own stream and max_tokens counts the
tokens already produced.
"""
from __future__ import annotations

import gc
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from pagedray.cluster.config import EngineConfig, build_engine_config
from pagedray.cluster.core.messages import (CoreOutput, CoreOutputs, CoreRequest, EngineInfo, EngineStats,
                                            completion_id)
from pagedray.cluster.core.grammar_gate import GrammarGate
from pagedray.cluster.core.request import Request, RequestStatus
from pagedray.cluster.core.scheduler import Scheduler
from pagedray.cluster.core.validation import apply_defaults, check_request, child_params
from pagedray.common.errors import EngineDeadError
from pagedray.cluster.core.lora_loads import LoRALoads
from pagedray.common.lora import LoRARequest
from pagedray.common.messages import SchedulerOutput
from pagedray.workers.step_output import StepOutput

logger = logging.getLogger(__name__)

__all__ = ["EngineCore", "EngineDeadError"]


@dataclass
class _Parent:
    """One request of the front: its n sequences."""
    request_id: str
    num_prompt_tokens: int
    children: list[Request]
    # Completions 1..n-1 until completion 0 has prefilled the prompt and they can be forked from it.
    pending: list[Request] = field(default_factory=list)
    # Per prompt position (the first has none): the runner's entries, when prompt_logprobs was asked.
    prompt_logprobs: list | None = None
    num_unfinished: int = 0
    first_sent: bool = False
    # Final only (CoreRequest.final_only): per completion, how many of its outputs the front has.
    emitted: list[int] | None = None


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        from pagedray.cluster.executors import make_executor   # torch: only where a core runs
        self.config = config
        self.executor = make_executor(config)
        self.scheduler = Scheduler(config.scheduler, config.cache.block_size, self.executor.num_kv_blocks,
                                   config.cache.enable_prefix_caching, config.speculative,
                                   max_loras=config.lora.max_loras if config.lora is not None else 0)
        self.loras = LoRALoads(self.executor, config.lora is not None)
        self.scheduler.loras_loading = self.loras.loading   # requests wait for their adapter's parse
        self.info = _engine_info(config, self.executor.num_kv_blocks)
        self._parents: dict[str, _Parent] = {}
        self._child_of: dict[str, tuple[_Parent, int]] = {}   # sequence id -> (its request, completion index)
        self._refused: list[CoreOutput] = []                  # sent with the next step
        # Requests whose grammar compiles (structured outputs) wait there, out of the scheduler.
        self.grammars = GrammarGate(lambda: _grammar_backend(config))
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.dead: BaseException | None = None
        self.async_scheduling = bool(config.scheduler.async_scheduling)
        # Overlapped steps: the step queued on the device whose output is not read yet.
        self._in_flight: tuple[SchedulerOutput, StepOutput] | None = None
        # Pipeline parallelism: steps submitted and not read yet, oldest first.
        self.pipeline_depth = config.parallel.pipeline_parallel_size
        self._pipeline: deque[tuple[SchedulerOutput, StepOutput]] = deque()
        self.scheduler.max_unread_steps = max(self.scheduler.max_unread_steps, self.pipeline_depth + 1)
        # Start-up leaves ~10^5 long-lived objects (modules, tensors, tokenizer). Frozen, they are
        # no longer walked by the full collections a long run triggers, each a pause of the step loop.
        gc.collect()
        gc.freeze()
        raise_gc_threshold(config.kernel.gc_threshold)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineCore":
        """Build with LLM(...)'s keywords (loads the model)."""
        return cls(build_engine_config(model, **kwargs))

    # -- requests ------------------------------------------------------------
    def add(self, requests: Iterable[CoreRequest]) -> None:
        """Queue requests. One the core cannot take comes back in the next step as an "abort"
        output whose `error` says why; it never raises for a bad request."""
        for req in requests:
            try:
                if self.grammars.needs(req):
                    self._check(req)
                    self.grammars.hold(req)   # joins the scheduler once its grammar has compiled
                else:
                    self._add(req)
            except (ValueError, TypeError) as exc:
                self._refuse(req, str(exc))

    def _refuse(self, req: CoreRequest, error: str) -> None:
        self._refused.append(CoreOutput(req.request_id, 0, [], finish_reason="abort", error=error))

    def _check(self, req: CoreRequest) -> None:
        if req.request_id in self._parents or req.request_id in self._child_of:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        apply_defaults(req.params, len(req.prompt_token_ids), self.info.max_model_len, self.info.eos_token_ids)
        check_request(req.prompt_token_ids, req.params, self.info, len(req.output_token_ids))

    def _admit_compiled(self) -> None:
        """Requests whose grammar compiled join the scheduler; those that failed are refused."""
        compiled, refused = self.grammars.ready()
        for req, error in refused:
            self._refuse(req, error)
        for req in compiled:
            try:
                self._add(req)
            except (ValueError, TypeError) as exc:
                self._refuse(req, str(exc))

    def _add(self, req: CoreRequest) -> None:
        rid, params, prompt = req.request_id, req.params, req.prompt_token_ids
        self._check(req)   # again for a request that waited for its grammar: its id may be taken since
        if req.output_token_ids and params.n > 1:
            raise ValueError("a resumed request must have n=1: resume each completion under its completion_id")
        if req.lora_request is not None:
            self.loras.start(req.lora_request)   # parsed off the step loop; the request waits for it
        arrival = req.arrival_time or None
        children = [Request(rid if params.n == 1 else completion_id(rid, i), prompt,
                            params if params.n == 1 else child_params(params, i), arrival, req.lora_request)
                    for i in range(params.n)]
        first = children[0]
        for token in req.output_token_ids:
            first.append_output_token(token)
        self.scheduler.add_request(first)   # raises before anything is registered
        parent = _Parent(rid, len(prompt), children, pending=children[1:], num_unfinished=len(children))
        if req.final_only and params.logprobs is None:
            parent.emitted = [len(req.output_token_ids)] + [0] * (len(children) - 1)
        if params.prompt_logprobs is not None and not req.output_token_ids:
            parent.prompt_logprobs = [None] * len(prompt)
        self._parents[rid] = parent
        for i, child in enumerate(children):
            self._child_of[child.request_id] = (parent, i)
        self.prompt_tokens_total += len(prompt)

    # -- LoRA adapters -------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Have the workers parse the adapter now (ValueError naming what does not fit); False if known."""
        return self.loras.add_now(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter (requests still running with it finish with it)."""
        return self.loras.remove(lora_int_id)

    def list_loras(self) -> list[int]:
        return sorted(self.loras.ready)

    def _poll_loras(self) -> None:
        """Adapters parsed since the last step; refuse the requests that waited for a failed one."""
        for lora, error in self.loras.poll():
            waiting = [p for p in self._parents.values() if p.children[0].lora_request == lora]
            for parent in waiting:
                self._refused.append(CoreOutput(parent.request_id, 0, [], finish_reason="abort", error=str(error)))
                self.abort([parent.request_id])

    def abort(self, request_ids: Iterable[str]) -> None:
        """Stop requests (a request id: all its completions; a `completion_id`: that one) and free
        their blocks. Unknown or finished ids are ignored; no output is sent for them."""
        request_ids = list(request_ids)
        self.grammars.abort(request_ids)
        for rid in request_ids:
            parent = self._parents.get(rid)
            children = parent.children if parent is not None else None
            if children is None:
                entry = self._child_of.get(rid)
                if entry is None:
                    continue
                parent, index = entry
                children = [parent.children[index]]
            for child in children:
                self._end(parent, child)

    def _end(self, parent: _Parent, child: Request) -> None:
        """Forget one sequence (aborted, or finished); forget the request after its last."""
        if self._child_of.pop(child.request_id, None) is None:
            return
        if child in parent.pending:
            parent.pending.remove(child)
        if not child.is_finished:
            self.scheduler.abort_requests([child.request_id])
            child.status = RequestStatus.FINISHED_ABORTED
        parent.num_unfinished -= 1
        if parent.num_unfinished == 0:
            self._parents.pop(parent.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._parents or self._refused or self.grammars)

    # -- the loop ------------------------------------------------------------
    def step(self) -> CoreOutputs:
        """Run one scheduler step; the deltas of every completion that advanced or finished.

        With async scheduling (one local CUDA worker) the step launched here runs on the device
        while this call reads the previous one's samples. Raises EngineDeadError when the executor
        failed (the core cannot go on).
        """
        if self.dead is not None:
            raise EngineDeadError(f"the engine core has failed: {self.dead}")
        if self.loras.loading:
            self._poll_loras()
        if self.grammars:
            if not self._parents and not self._refused and self._in_flight is None:
                self.grammars.wait(0.01)   # nothing else to run: do not spin while a grammar compiles
            self._admit_compiled()
        outputs, self._refused = self._refused, []
        if self.pipeline_depth > 1:
            launched = self._fill_pipeline()
        else:
            sched = self.scheduler.schedule()
            launched = None
            if not sched.is_empty or sched.finished_req_ids:
                launched = (sched, self._run_executor(self.executor.execute_model_async, sched))
            if self.async_scheduling:
                # The step just queued runs on the device while the host reads the previous one.
                launched, self._in_flight = self._in_flight, launched
        if launched is None:
            return CoreOutputs(outputs, self.get_stats() if outputs else None, time.monotonic())
        sched, step_out = launched
        runner_out = self._run_executor(_read_step, step_out)
        self._record_prompt_logprobs(sched, runner_out)
        logprobs, child_of, num_generated = runner_out.logprobs, self._child_of, 0
        for request, new_tokens in self.scheduler.update_from_output(sched, runner_out):
            entry = child_of.get(request.request_id)
            if entry is None:
                continue
            parent, index = entry
            if parent.pending and index == 0:
                self._start_pending(parent)
            num_generated += len(new_tokens)
            emitted = parent.emitted
            if emitted is not None:
                if not request.status.is_finished and (index or parent.first_sent):
                    continue   # final only: its tokens wait in the request until it finishes
                outputs_so_far = request.output_token_ids
                new_tokens = outputs_so_far[emitted[index]:]
                emitted[index] = len(outputs_so_far)
            out = CoreOutput(parent.request_id, index, new_tokens)
            if request.sampling_params.logprobs is not None:
                accepted = runner_out.accepted_logprobs.get(request.request_id)
                out.new_logprobs = (accepted[:len(new_tokens)] if accepted is not None
                                    else [logprobs.get(request.request_id) or []])
            if index == 0 and not parent.first_sent:
                parent.first_sent = True
                out.num_cached_tokens = request.num_cached_tokens
                out.prompt_logprobs = parent.prompt_logprobs
            if request.status.is_finished:
                out.finish_reason = request.status.finish_reason
                out.stop_reason = request.stop_reason
                self._end(parent, request)
            outputs.append(out)
        self.generation_tokens_total += num_generated
        return CoreOutputs(outputs, self.get_stats(), time.monotonic())

    def _fill_pipeline(self) -> tuple[SchedulerOutput, StepOutput] | None:
        """Submit steps until pipeline_depth are in flight or none is left to build; the oldest
        in-flight step, taken off the queue to be read (None when nothing is in flight)."""
        pipeline = self._pipeline
        while len(pipeline) < self.pipeline_depth:
            busy = {rid for sched, _ in pipeline for rid in sched.num_scheduled_tokens}
            sched = self.scheduler.schedule(skip=busy)
            if sched.is_empty and not sched.finished_req_ids:
                break
            pipeline.append((sched, self._run_executor(self.executor.execute_model_async, sched)))
        return pipeline.popleft() if pipeline else None

    def _run_executor(self, fn, arg):
        try:
            return fn(arg)
        except Exception as exc:  # a dead worker, OOM, collective failure
            self.dead = exc
            raise EngineDeadError(f"the executor failed: {exc}") from exc

    def _record_prompt_logprobs(self, sched: SchedulerOutput, runner_out) -> None:
        """Place each chunk's prompt logprobs at the chunk's start, which the step's message to the
        workers carries (a recompute after preemption rewrites the same positions)."""
        if not runner_out.prompt_logprobs:
            return
        starts = {r.req_id: r.num_computed_tokens for r in sched.scheduled_new_reqs}
        cached = sched.scheduled_cached_reqs
        starts.update(zip(cached.req_ids, cached.num_computed_tokens))
        for rid, entries in runner_out.prompt_logprobs.items():
            entry = self._child_of.get(rid)
            if entry is None or entry[0].prompt_logprobs is None or rid not in self.scheduler.requests:
                continue
            table = entry[0].prompt_logprobs
            start = starts[rid] + 1   # position p's hidden state predicts token p + 1
            for offset, logprob_entry in enumerate(entries):
                table[start + offset] = list(logprob_entry)

    def _start_pending(self, parent: _Parent) -> None:
        """Completion 0 just got its first token: fork the others from its prompt blocks.

        When completion 0 already finished (a stop at its first token freed its blocks), or was
        preempted while that token was in flight (overlapped steps: its blocks are gone too), they
        start as ordinary requests instead (prefix caching still shares the prompt's full blocks).
        """
        first = parent.children[0]
        for child in parent.pending:
            if first.status is not RequestStatus.RUNNING:
                self.scheduler.add_request(child)
            else:
                child.num_computed_tokens = parent.num_prompt_tokens - 1
                self.scheduler.fork_request(first.request_id, child)
        parent.pending = []

    # -- health and stats ----------------------------------------------------
    def get_stats(self) -> EngineStats:
        bm, sched = self.scheduler.block_manager, self.scheduler
        return EngineStats(
            num_running=sched.num_running, num_waiting=sched.num_waiting,
            num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks,
            num_used_blocks=bm.num_used_blocks, prefix_cache_hit_rate=bm.hit_rate,
            prefix_cache_hit_tokens=bm.prefix_cache_hit_tokens, num_preemptions=sched.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total, generation_tokens_total=self.generation_tokens_total,
            **(sched.spec.stats() if sched.spec is not None else {}))

    def shutdown(self) -> None:
        # Steps still queued hold device tensors and, for a speculative step whose tokens are read
        # late, the worker's model runner: drop them first, or the weights and KV cache outlive the
        # executor's shutdown (measured: the next engine in the process found no memory for its KV).
        self._in_flight = None
        self._pipeline.clear()
        # Start-up froze every object then alive (the model included): unfrozen, the collection
        # in the worker's shutdown can free the model's reference cycles (CUDA graph runners make
        # some); frozen, the weights stayed allocated (measured: 15 GiB per 8B engine built).
        gc.unfreeze()
        self.loras.shutdown()
        self.executor.shutdown()


def raise_gc_threshold(threshold: int) -> None:
    """Python's young-generation GC threshold raised to `threshold` (0: unchanged), process-wide.

    The step loop's garbage is freed by reference counting; what a collection finds is the live
    per-request state, which it then walks again and again. A higher threshold keeps collecting
    cycles (every `threshold` net allocations) without walking that state every few hundred.
    """
    current = gc.get_threshold()
    if threshold > current[0]:
        gc.set_threshold(threshold, *current[1:])


def _read_step(step: StepOutput):
    """The step's output (bound: an executor's StepOutput subclass may read it its own way)."""
    return step.get()


def _grammar_backend(config: EngineConfig):
    """The grammar backend of this engine's tokenizer (shared with a worker in this process)."""
    from pagedray.workers.structured_output import backend_for
    return backend_for(config.model.tokenizer, config.model.vocab_size)


def _engine_info(config: EngineConfig, num_kv_blocks: int) -> EngineInfo:
    mc = config.model
    return EngineInfo(model=mc.model, tokenizer=mc.tokenizer, architecture=mc.architecture,
                      max_model_len=mc.max_model_len, vocab_size=mc.vocab_size,
                      block_size=config.cache.block_size, num_kv_blocks=num_kv_blocks,
                      tensor_parallel_size=config.parallel.tensor_parallel_size,
                      eos_token_ids=config_eos_token_ids(mc), max_num_seqs=config.scheduler.max_num_seqs,
                      max_lora_rank=config.lora.max_lora_rank if config.lora is not None else 0)


def config_eos_token_ids(model_config) -> list[int]:
    """eos ids as HF generate would use them, from the checkpoint: generation_config, then config.
    (The front falls back to its tokenizer's eos when both are silent.)"""
    eos = None
    path = os.path.join(model_config.model, "generation_config.json")
    if os.path.isfile(path):
        from transformers import GenerationConfig
        try:
            eos = GenerationConfig.from_pretrained(model_config.model).eos_token_id
        except (OSError, ValueError) as exc:   # transformers reports bad JSON as OSError
            logger.warning("ignoring %s, which transformers cannot read (%s): eos ids come from "
                           "config.json or the tokenizer", path, exc)
    if eos is None:
        eos = getattr(model_config.hf_config, "eos_token_id", None)
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
