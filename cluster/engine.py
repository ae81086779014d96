"""The synchronous engine: tokenize, schedule, execute, detokenize, stop.

`LLM` (offline) and `AsyncEngine` (serving) both drive this class. A request
with n > 1 runs as n child requests sharing the prompt's KV blocks: child 0
prefills the prompt; when it has its first token, children 1..n-1 are forked
from it (`Scheduler.fork_request`) at prompt length - 1, sharing every block of
the prompt and copying only the block of the last prompt token, which each child
recomputes to draw its own first token.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterable

from pagedray.cluster.config import EngineConfig, build_engine_config
from pagedray.cluster.detokenizer import IncrementalDetokenizer
from pagedray.cluster.executors import make_executor
from pagedray.cluster.outputs import CompletionOutput, RequestOutput
from pagedray.cluster.request import Request, RequestStatus
from pagedray.cluster.scheduler import Scheduler
from pagedray.workers.messages import SchedulerOutput
from pagedray.workers.sampling_params import SamplingParams
from pagedray.workers.step_output import StepOutput

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The executor failed; every in-flight request of this engine is lost."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_used_blocks: int
    prefix_cache_hit_rate: float
    prefix_cache_hit_tokens: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int


@dataclass
class _Child:
    """One of a request's n samples."""
    index: int
    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[dict[int, float]] | None


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[_Child]
    # Children 1..n-1 until child 0 has prefilled the prompt and they can be forked from it.
    pending: list[_Child] = field(default_factory=list)
    # [None, {token: logprob} per prompt position from the 2nd] when prompt_logprobs was asked.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        if len(self.children) == 1:
            return self.children[0].request.status.is_finished
        return all(c.request.is_finished for c in self.children)


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None) -> None:
        self.config = config
        self.model_config = config.model
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config.model)
        self.eos_token_ids = _eos_token_ids(config.model, self.tokenizer)
        self.executor = make_executor(config)
        self.num_kv_blocks = self.executor.num_kv_blocks
        self.scheduler = Scheduler(config.scheduler, config.cache.block_size, self.num_kv_blocks,
                                   config.cache.enable_prefix_caching)
        self.parents: dict[str, _Parent] = {}
        self.child_to_parent: dict[str, str] = {}
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.dead: BaseException | None = None
        self.async_scheduling = bool(config.scheduler.async_scheduling)
        # Overlapped steps: the step queued on the device whose output is not read yet.
        self._in_flight: tuple[SchedulerOutput, StepOutput] | None = None

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "LLMEngine":
        return cls(build_engine_config(model, **kwargs))

    # -- requests ------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | dict, params: SamplingParams | None = None) -> None:
        """Validate and queue a request; raises ValueError naming the bad field."""
        self._check_alive()
        if request_id in self.parents:
            raise ValueError(f"request_id {request_id!r} is already in use")
        params = (params or SamplingParams()).clone()
        prompt_text, token_ids = self._tokenize(prompt)
        self._validate(token_ids, params)
        children = []
        for i in range(params.n):
            child_params = params if params.n == 1 else _child_params(params, i)
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens, params.stop)
            children.append(_Child(i, Request(child_id, token_ids, child_params), detok,
                                   [] if params.logprobs is not None else None))
        parent = _Parent(request_id, prompt_text, token_ids, children, pending=children[1:])
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None] * len(token_ids)
        self.scheduler.add_request(children[0].request)
        self.parents[request_id] = parent
        for child in children:
            self.child_to_parent[child.request.request_id] = request_id
        self.prompt_tokens_total += len(token_ids)

    def _tokenize(self, prompt: str | dict) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt is text but this model has no tokenizer: pass prompt_token_ids")
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        raise ValueError(f"prompt must be a str or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        max_len = self.model_config.max_model_len
        if not token_ids:
            raise ValueError("prompt must not be empty (0 tokens)")
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids holds token id {bad[0]} outside the vocabulary [0, {vocab})")
        if len(token_ids) >= max_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens: it must be shorter than "
                             f"max_model_len={max_len} to leave room for output")
        if params.max_tokens is None:
            params.max_tokens = max_len - len(token_ids)
        elif len(token_ids) + params.max_tokens > max_len:
            raise ValueError(f"max_tokens={params.max_tokens} cannot fit: prompt has {len(token_ids)} tokens "
                             f"and max_model_len is {max_len} (at most {max_len - len(token_ids)})")
        capacity = self.num_kv_blocks * self.config.cache.block_size
        if len(token_ids) + params.max_tokens > capacity:
            raise ValueError(f"max_tokens={params.max_tokens} cannot fit: prompt ({len(token_ids)} tokens) plus "
                             f"max_tokens exceeds the KV cache capacity of {capacity} tokens "
                             f"({self.num_kv_blocks} blocks of {self.config.cache.block_size})")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > vocab:
                raise ValueError(f"{name} must be <= the vocabulary size {vocab}, got {getattr(params, name)}")
        if self.eos_token_ids:
            params.eos_token_id = self.eos_token_ids[0]
            if not params.ignore_eos:
                extra = [t for t in self.eos_token_ids[1:] if t not in params.stop_token_ids]
                params.stop_token_ids = params.stop_token_ids + extra

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            parent = self.parents.pop(rid, None)
            if parent is None:
                continue
            child_ids = [c.request.request_id for c in parent.children]
            self.scheduler.abort_requests(child_ids)
            for cid in child_ids:
                self.child_to_parent.pop(cid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents)

    # -- the loop ------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Run one scheduler step; return cumulative outputs of requests that advanced.

        finished_only: return only those that finished in this step (the bookkeeping is the
        same); for callers such as `LLM.generate` that read nothing else, it saves building an
        output object, with a copy of every token so far, per running request per step.
        """
        self._check_alive()
        sched = self.scheduler.schedule()
        launched = None
        if not sched.is_empty or sched.finished_req_ids:
            launched = (sched, self._run_executor(self.executor.execute_model_async, sched))
        if self.async_scheduling:
            # The step just queued runs on the device while the host reads the previous one.
            launched, self._in_flight = self._in_flight, launched
        if launched is None:
            return []
        sched, step_out = launched
        runner_out = self._run_executor(StepOutput.get, step_out)
        self._record_prompt_logprobs(sched, runner_out)
        advanced: dict[str, _Parent] = {}
        for request, new_tokens in self.scheduler.update_from_output(sched, runner_out):
            parent_id = self.child_to_parent.get(request.request_id)
            if parent_id is None:
                continue
            parent = self.parents[parent_id]
            if parent.pending and request is parent.children[0].request:
                self._start_pending(parent)
            self._process_tokens(parent, request, new_tokens, runner_out)
            advanced[parent_id] = parent
        if finished_only:
            return [self._finish_output(p) for p in advanced.values() if p.finished]
        return [self._finish_output(p) for p in advanced.values()]

    def _run_executor(self, fn, arg):
        try:
            return fn(arg)
        except Exception as exc:  # a dead worker, OOM, collective failure
            self.dead = exc
            raise EngineDeadError(f"the executor failed: {exc}") from exc

    def _record_prompt_logprobs(self, sched, runner_out) -> None:
        """Place each chunk's prompt logprobs at the chunk's start, which the step's message to the
        workers carries (a recompute after preemption rewrites the same positions)."""
        if not runner_out.prompt_logprobs:
            return
        starts = {r.req_id: r.num_computed_tokens for r in sched.scheduled_new_reqs}
        starts.update((r.req_id, r.num_computed_tokens) for r in sched.scheduled_cached_reqs)
        for rid, entries in runner_out.prompt_logprobs.items():
            parent = self.parents.get(self.child_to_parent.get(rid, ""))
            if parent is None or parent.prompt_logprobs is None or rid not in self.scheduler.requests:
                continue
            start = starts[rid] + 1   # position p's hidden state predicts token p + 1
            for offset, entry in enumerate(entries):
                parent.prompt_logprobs[start + offset] = {tok: lp for tok, lp, _ in entry}

    def _start_pending(self, parent: _Parent) -> None:
        """Child 0 just got its first token: fork the other children from its prompt blocks.

        When child 0 already finished (a stop at its first token freed its blocks), they start as
        ordinary requests instead (prefix caching still shares the prompt's full blocks).
        """
        first = parent.children[0].request
        for child in parent.pending:
            if first.is_finished:
                self.scheduler.add_request(child.request)
            else:
                child.request.num_computed_tokens = len(parent.prompt_token_ids) - 1
                self.scheduler.fork_request(first.request_id, child.request)
        parent.pending = []

    def _process_tokens(self, parent: _Parent, request: Request, new_tokens: list[int], runner_out) -> None:
        children = parent.children
        child = children[0] if len(children) == 1 else next(c for c in children if c.request is request)
        self.generation_tokens_total += len(new_tokens)
        if parent.first_token_time is None:
            parent.first_token_time = time.monotonic()
        if child.logprobs is not None:
            entry = runner_out.logprobs.get(request.request_id) or []
            child.logprobs.append({tok: lp for tok, lp, _ in entry})
        if request.status is RequestStatus.FINISHED_STOPPED:
            # Ended by eos or a stop token id: as vLLM, that token's text is not part of the output.
            new_tokens = new_tokens[:-1]
        child.detokenizer.add_tokens(new_tokens, final=request.is_finished)
        if child.detokenizer.stopped_on is not None:
            if not request.is_finished:
                self.scheduler.finish_requests([request.request_id], RequestStatus.FINISHED_STOPPED)
            elif request.status is RequestStatus.FINISHED_LENGTH:
                request.status = RequestStatus.FINISHED_STOPPED   # as vLLM: a stop string wins

    def _finish_output(self, parent: _Parent) -> RequestOutput:
        out = self.make_output(parent)
        if out.finished:
            self.parents.pop(parent.request_id, None)
            for c in parent.children:
                self.child_to_parent.pop(c.request.request_id, None)
        return out

    @staticmethod
    def make_output(parent: _Parent) -> RequestOutput:
        completions = []
        for c in parent.children:
            req = c.request
            completions.append(CompletionOutput(
                index=c.index, text=c.detokenizer.visible_text(req.is_finished),
                token_ids=list(req.output_token_ids),
                logprobs=list(c.logprobs) if c.logprobs is not None else None,
                finish_reason=req.status.finish_reason if req.is_finished else None))
        metrics = {"arrival_time": parent.arrival_time}
        if parent.first_token_time is not None:
            metrics["first_token_time"] = parent.first_token_time
        prompt_logprobs = list(parent.prompt_logprobs) if parent.prompt_logprobs is not None else None
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, completions,
                             finished=parent.finished,
                             num_cached_tokens=parent.children[0].request.num_cached_tokens,
                             prompt_logprobs=prompt_logprobs, metrics=metrics)

    # -- health and stats ----------------------------------------------------
    def _check_alive(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(f"the engine has failed: {self.dead}")

    def get_stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_free_blocks=bm.num_free_blocks, num_total_blocks=self.num_kv_blocks,
            num_used_blocks=bm.num_used_blocks, prefix_cache_hit_rate=bm.hit_rate,
            prefix_cache_hit_tokens=bm.prefix_cache_hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total)

    def shutdown(self) -> None:
        self.executor.shutdown()


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    child = params.clone()
    child.n = 1
    if index > 0:
        child.prompt_logprobs = None   # computed once, by child 0
    if params.seed is not None:
        # Distinct but reproducible streams for each of the n samples.
        child.seed = params.seed * 1_000_003 + index
    return child


def _load_tokenizer(model_config):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_config.tokenizer)
    except Exception as exc:  # a weights-only folder: token-id prompts still work
        if model_config.tokenizer != model_config.model:
            raise ValueError(f"cannot load tokenizer {model_config.tokenizer!r}: {exc}") from exc
        logger.warning("no tokenizer in %s; only prompt_token_ids prompts will work", model_config.model)
        return None


def _eos_token_ids(model_config, tokenizer) -> list[int]:
    """eos ids as HF generate would use them: generation_config, then config, then tokenizer."""
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
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)
