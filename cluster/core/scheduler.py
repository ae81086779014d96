"""Continuous batching: which requests run each step, and how many tokens each.

Pure Python (no torch). One `schedule()` per engine step builds a `SchedulerOutput` and advances
the scheduled requests' computed tokens (vLLM V1); after the workers ran it, `update_from_output()`
appends the sampled tokens and applies token-level stops.

Overlapped steps (async scheduling): the engine may schedule step N+1 before it reads step N's
output. A request that samples in step N then holds a placeholder (`num_output_placeholders`) for
the token it has not received; step N+1 may already compute that token's K/V (the workers take its
id from step N's samples on the device). A request whose placeholders will certainly end it by
length is not scheduled again; one that stops on a token it has not received yet gets one wasted
step, whose token `update_from_output` drops. At most one step is ahead of the outputs read.

Policy (vLLM V1):
- Running requests first, oldest first: a decode runs 1 token, a request in chunked prefill its next
  chunk capped by the remaining token budget. If a running request cannot get blocks, the newest
  running request is preempted (recompute: its blocks are freed, it keeps its outputs and goes to the
  FRONT of the waiting queue); if the request being scheduled is itself the newest, it is preempted.
- Then waiting requests, strictly first come first served: when the head of the queue cannot be
  admitted (token budget without chunked prefill, blocks, `max_num_seqs`), admission stops. Nothing
  is admitted in a step that preempted.
- Prefill pacing (`tpot_target_ratio`, cluster/core/step_pacing.py): when set, a step with running
  decodes carries prefill (chunks of running requests and admissions) only up to a cap chosen from
  measured step times, so that the decodes' mean step time stays near the target; off, the token
  budget alone decides.
- Workers keep per-request state: a request travels whole (`NewRequestData`) the first time, after a
  preemption, or when copy-on-write replaced a block the workers already hold (it is then also listed
  in `finished_req_ids`, which workers apply first); otherwise as a row of `CachedRequestData`.

Pipeline parallelism: the engine keeps up to pipeline_parallel_size steps in flight and passes
`schedule(skip=...)` the requests of those steps: a request is never in two in-flight steps (its
next token is not known until its step left the last stage), so the next step is built from the
others.

Speculative decoding (cluster/core/spec.py): a request at its decode point runs its proposals too
(`scheduled_spec_decode_tokens`, in the budget and in KV slots, plus a drafter's lookahead slots);
its output brings 1 to k + 1 tokens, and the slots of the rejected proposals are given back.

Call `abort_requests`/`finish_requests` between steps. With overlapped steps that is while a step is
in flight: its blocks may be freed and handed out again at once, because the workers run steps in
order, so a step scheduled later reads or writes them only after the step in flight wrote them.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterable

from pagedray.cluster.core.block_manager import BlockManager, check_fits_kv_cache
from pagedray.cluster.config import SchedulerConfig
from pagedray.cluster.core.request import Request, RequestStatus
from pagedray.cluster.core.spec import SpecDecoding
from pagedray.cluster.core.step_pacing import PrefillPacer
from pagedray.common.messages import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput


# The new block ids of a delta that has none (most decode steps): one shared, immutable, empty value.
_NO_BLOCKS: tuple[int, ...] = ()


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, block_size: int, num_kv_blocks: int,
                 enable_prefix_caching: bool, speculative_config=None,
                 max_loras: int = 0) -> None:
        self.config = scheduler_config
        # Distinct LoRA adapters one step may use (the workers' device slots); 0: LoRA off.
        self.max_loras = max_loras
        self.loras_loading: set[int] = set()   # adapters being parsed: their requests wait
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.requests: dict[str, Request] = {}      # every unfinished request, by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []            # admission order: the last one is the newest
        self.num_preemptions = 0
        # What the workers hold per request: (tokens sent, blocks sent).
        self._sent: dict[str, tuple[int, int]] = {}
        self._finished_ids: set[str] = set()
        # The requests each recent schedule() ran, by id(SchedulerOutput): an output arriving after
        # its request was aborted and its id reused must not reach the new request.
        self._step_requests: OrderedDict[int, dict[str, Request]] = OrderedDict()
        self.max_unread_steps = 4   # raised by an engine that keeps more steps in flight (pipeline)
        # Speculative decoding (cluster/core/spec.py): None when off.
        self.spec = (SpecDecoding(speculative_config, scheduler_config.max_model_len,
                                  bool(scheduler_config.async_scheduling))
                     if speculative_config is not None else None)
        self._spec_tokens: dict[str, list[int]] = {}    # this step's proposals, by request
        self._trimmed: dict[str, int] = {}              # block tables cut since sent: their new length
        # Prefill chunks next to running decodes sized from step times (cluster/core/step_pacing.py).
        self.pacer = (PrefillPacer(scheduler_config.tpot_target_ratio, scheduler_config.max_prefill_delay_ms,
                                   scheduler_config.min_prefill_chunk_tokens, speculative=self.spec is not None)
                      if scheduler_config.tpot_target_ratio is not None else None)

    # -- queries -------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running or self.waiting)

    # -- request lifecycle ---------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError when it could never run (too long for max_model_len or the cache)."""
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request_id {rid!r} is already scheduled")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {rid!r} must be new (WAITING, nothing computed), got {request!r}")
        max_len = self.config.max_model_len
        if request.num_tokens > max_len:
            raise ValueError(f"request {rid!r} has {request.num_tokens} tokens, above max_model_len={max_len}")
        self._check_fits_cache(request)
        self._set_stops(request)
        self.requests[rid] = request
        self.waiting.append(request)

    def _check_fits_cache(self, request: Request) -> None:
        bm = self.block_manager
        try:
            check_fits_kv_cache(request.num_tokens, request.num_prompt_tokens, request.sampling_params.max_tokens,
                                self.config.max_model_len, bm.num_blocks, bm.block_size,
                                self.spec.num_lookahead_slots if self.spec is not None else 0)
        except ValueError as exc:
            raise ValueError(f"request {request.request_id!r}: {exc}") from None

    def fork_request(self, parent_id: str, child: Request) -> None:
        """Start `child` as a running copy-on-write fork of a running parent.

        The child shares the parent's blocks for its first `child.num_computed_tokens` tokens, which
        must equal the parent's and be already computed by it. The child joins the running requests
        (as the newest; `max_num_seqs` is not checked here).
        """
        parent = self.requests.get(parent_id)
        if parent is None or parent.status is not RequestStatus.RUNNING:
            raise ValueError(f"fork_request: parent {parent_id!r} is not running")
        k = child.num_computed_tokens
        if child.request_id in self.requests:
            raise ValueError(f"request_id {child.request_id!r} is already scheduled")
        if not (k <= parent.num_computed_tokens and k < child.num_tokens
                and child.all_token_ids[:k] == parent.all_token_ids[:k]):
            raise ValueError(f"fork_request: the child's first num_computed_tokens={k} tokens must be computed "
                             "tokens of the parent, and the child must have a token left to compute")
        self._check_fits_cache(child)
        self._set_stops(child)
        self.block_manager.fork(parent_id, child.request_id, k)
        # Copy the block the child writes next now, so the parent (already on the workers) never has
        # to swap a block; if no block is free, allocate_slots copies it later.
        self.block_manager.copy_on_write(child.request_id, k)
        child.status = RequestStatus.RUNNING
        self.requests[child.request_id] = child
        self.running.append(child)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> None:
        """End requests (waiting or running) with a finished status; unknown or finished ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"status must be a finished status, got {status}")
        for rid in ([request_ids] if isinstance(request_ids, str) else request_ids):
            request = self.requests.get(rid)
            if request is not None:
                self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request.request_id)
        del self.requests[request.request_id]
        if self.spec is not None:
            self.spec.in_flight.pop(request.request_id, None)
            self.spec.backoff.forget(request.request_id)
        self._forget(request.request_id)

    def _forget(self, request_id: str) -> None:
        """Tell the workers to drop the request (if they hold it)."""
        self._trimmed.pop(request_id, None)
        if self._sent.pop(request_id, None) is not None:
            self._finished_ids.add(request_id)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.spec_token_ids = []
        self._spec_tokens.pop(request.request_id, None)
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        self._forget(request.request_id)

    # -- scheduling ----------------------------------------------------------
    def schedule(self, skip: frozenset[str] | set[str] = frozenset()) -> SchedulerOutput:
        """The next step; requests in `skip` (in a step still in flight) are left out of it."""
        budget = self.config.max_num_batched_tokens
        plan = self.pacer.plan(self.running, self.waiting, budget, skip) if self.pacer is not None else None
        prefill_left = plan.prefill_cap if plan is not None else budget   # prefill tokens this step may take
        scheduled: dict[str, int] = {}
        preempted = False
        running, allocate = self.running, self._allocate
        # Without speculation _ends_in_flight and _num_new_tokens run inline below (this loop is most
        # of a decode step's host work at batch ~1000), and a request has no proposals to add.
        plain = self.spec is None
        chunked = self.config.enable_chunked_prefill
        fits_one = self.block_manager.fits_one_token
        ending = 0      # running requests that their tokens in flight end (overlapped steps)
        # (A preemption pops from the end of `running`: the iterator then stops before the popped ones.)
        for request in running:
            if budget <= 0:
                break
            if skip and request.request_id in skip:
                continue
            pending = request.num_output_placeholders
            if plain:
                total = len(request.all_token_ids) + pending
                if pending and total >= request.length_limit:
                    ending += 1
                    continue
                num_new = total - request.num_computed_tokens
                if num_new > budget:
                    num_new = budget if chunked else 0
            elif pending and self._ends_in_flight(request):
                ending += 1
                continue
            else:
                num_new = self._num_new_tokens(request, request.num_computed_tokens, budget)
            if num_new > 1 and plan is not None:    # a chunked prefill's next chunk: within the paced cap
                num_new = min(num_new, prefill_left)
                prefill_left -= num_new
            if num_new == 0:
                continue
            if not plain and (request.spec_token_ids or pending):
                drafts = self.spec.drafts_for(request, num_new, budget)
                if drafts:
                    self._spec_tokens[request.request_id] = drafts
                    num_new += len(drafts)
            if not (num_new == 1 and plain and fits_one(request)) and allocate(request, num_new) is None:
                preempted = True   # (a decode step almost never gets here)
                if not self._preempt_until_fits(request, num_new):
                    break
            scheduled[request.request_id] = num_new
            budget -= num_new
        if not preempted:
            # A request ending with its tokens in flight leaves its seat now: its successor is
            # admitted in this step, as it would be without the overlap.
            self._admit_waiting(min(budget, prefill_left), scheduled, self.config.max_num_seqs + ending, skip)
        output = self._build_output(scheduled)   # (and counts the scheduled tokens as computed)
        for rid, drafts in output.scheduled_spec_decode_tokens.items():
            self.spec.advance(self.requests[rid], len(drafts))
        if self.spec is not None and self.spec.backoff.state:
            output.spec_skip_draft_req_ids = self.spec.skip_drafting(scheduled)
        if scheduled:   # (an empty step has no output to match; a pipeline builds one per fill)
            self._step_requests[id(output)] = dict(zip(scheduled, map(self.requests.__getitem__, scheduled)))
            if plan is not None:
                self.pacer.scheduled(id(output), plan, output.total_num_scheduled_tokens, self.max_unread_steps)
        while len(self._step_requests) > self.max_unread_steps:     # steps whose output was never read
            self._step_requests.popitem(last=False)
        return output

    def _num_new_tokens(self, request: Request, num_computed: int, budget: int) -> int:
        """Tokens to run this step: all that are left, cut to the budget only with chunked prefill (else 0).
        (The running loop of `schedule` holds an inline copy for steps without speculation.)"""
        pending = request.num_output_placeholders
        if pending and self._ends_by_length(request, len(request.all_token_ids) + pending):
            return 0    # its tokens in flight end it (or may, when they verify proposals): nothing to compute
        left = len(request.all_token_ids) + pending - num_computed
        if left <= budget:
            return left
        return budget if self.config.enable_chunked_prefill else 0

    def _allocate(self, request: Request, num_new: int, blocks: list[int] | None = None) -> list[int] | None:
        if self.spec is None:
            return self.block_manager.allocate_slots(request, num_new, blocks)
        return self.block_manager.allocate_slots(request, num_new, blocks, self.spec.num_lookahead_slots)

    def _preempt_until_fits(self, request: Request, num_new: int) -> bool:
        """After allocate_slots failed: preempt the newest running requests until the request's slots
        fit. False when the request itself was the newest, and so was preempted."""
        while True:
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return False
            if self._allocate(request, num_new) is not None:
                return True

    def _ends_in_flight(self, request: Request) -> bool:
        """Whether its tokens in flight certainly end it (one per step: proposals may be rejected)."""
        pending = request.num_output_placeholders
        if self.spec is not None and self.spec.in_flight:
            pending -= self.spec.in_flight.get(request.request_id, 0)
        return len(request.all_token_ids) + pending >= request.length_limit   # (_ends_by_length, inline)

    def _admit_waiting(self, budget: int, scheduled: dict[str, int], max_running: int,
                       skip: frozenset[str] | set[str] = frozenset()) -> None:
        bm = self.block_manager
        loras = self._running_loras()
        j = 0
        while j < len(self.waiting) and budget > 0 and len(self.running) < max_running:
            request = self.waiting[j]
            if request.num_output_placeholders or request.request_id in skip:
                break   # preempted while in flight: it resumes once that step (or token) is read
            lora = request.lora_request
            if lora is not None and (lora.lora_int_id in self.loras_loading or self.max_loras and
                                     lora.lora_int_id not in loras and len(loras) >= self.max_loras):
                j += 1   # its adapter is being parsed, or every slot is taken: the next may go first
                continue
            blocks, num_computed = bm.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, num_computed, budget)
            if num_new == 0 or self._allocate(request, num_new, blocks) is None:
                break   # FCFS: nobody overtakes the head of the queue but for want of an adapter slot
            del self.waiting[j]
            if lora is not None:
                loras.add(lora.lora_int_id)
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_computed
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled[request.request_id] = num_new
            budget -= num_new

    def _running_loras(self) -> set[int]:
        return ({r.lora_request.lora_int_id for r in self.running if r.lora_request is not None}
                if self.max_loras else set())

    def _build_output(self, scheduled: dict[str, int]) -> SchedulerOutput:
        """The step's message to the workers; then the scheduled tokens count as computed, and a
        request that reaches the end of its tokens (placeholders included) samples one, so it holds
        one more placeholder until it arrives (one pass over the requests for both)."""
        new_reqs: list[NewRequestData] = []
        cached = CachedRequestData()
        # The columns, appended to directly on the common path (a decode row: no cut, no resend).
        cached_ids, cached_tokens, cached_blocks, cached_computed = (
            cached.req_ids, cached.new_token_ids, cached.new_block_ids, cached.num_computed_tokens)
        bm, requests, all_sent = self.block_manager, self.requests, self._sent
        tables, any_replaced, trimmed = bm.tables, bm.has_replaced(), self._trimmed
        for rid, num in scheduled.items():
            request = requests[rid]
            table = tables[rid]
            sent = all_sent.get(rid)
            if any_replaced:
                replaced = bm.take_replaced(rid)
                if sent is not None and replaced is not None and replaced < sent[1]:
                    # Copy-on-write swapped a block the workers hold: resend the request whole.
                    self._finished_ids.add(rid)
                    sent = None
            tokens = request.all_token_ids
            computed = request.num_computed_tokens
            if sent is None:
                new_reqs.append(NewRequestData(rid, list(tokens), request.num_prompt_tokens,
                                               request.sampling_params, list(table), computed,
                                               request.lora_request))
            elif trimmed and rid in trimmed:
                start = min(trimmed.pop(rid), sent[1])
                cached.append(rid, tokens[sent[0]:], table[start:] if start < len(table) else _NO_BLOCKS,
                              computed, None if start == sent[1] else start)
            else:
                sent_tokens, sent_blocks = sent
                cached_ids.append(rid)
                cached_tokens.append(tokens[sent_tokens:])
                cached_blocks.append(table[sent_blocks:] if sent_blocks < len(table) else _NO_BLOCKS)
                cached_computed.append(computed)
            all_sent[rid] = (len(tokens), len(table))
            computed += num
            request.num_computed_tokens = computed
            if computed >= len(tokens) + request.num_output_placeholders:
                request.num_output_placeholders += 1   # (past it by the proposals it verifies)
        finished, self._finished_ids = self._finished_ids, set()
        output = SchedulerOutput(new_reqs, cached, scheduled, sum(scheduled.values()), finished,
                                 self.block_manager.take_pending_copies())
        if self._spec_tokens:
            output.scheduled_spec_decode_tokens, self._spec_tokens = self._spec_tokens, {}
        return output

    # -- results -------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           runner_output: ModelRunnerOutput) -> list[tuple[Request, list[int]]]:
        """Append each scheduled request's sampled token and apply stops; return (request, new token
        ids) for each that got one. A request finished or aborted since the schedule gets nothing;
        one preempted since (waiting, token in flight) keeps its token and resumes with it."""
        results: list[tuple[Request, list[int]]] = []
        requests, spec, stop_status = self.requests, self.spec, self._stop_status
        scheduled = self._step_requests.pop(id(scheduler_output), None)
        if scheduled is None:   # (a step this scheduler no longer tracks)
            scheduled = {rid: requests.get(rid) for rid in scheduler_output.num_scheduled_tokens}
        if self.pacer is not None:
            self.pacer.observe(id(scheduler_output), runner_output.step_time_s)
        # The sampled ids come in the step's order; a request mid-prefill has none.
        for rid, token in runner_output.sampled_token_ids.items():
            request = requests.get(rid)
            if request is None or request is not scheduled.get(rid):
                continue    # finished or aborted since the schedule
            request.num_output_placeholders -= 1
            if spec is not None:
                new_tokens, status = self._apply_spec(request, scheduler_output, runner_output, token)
            else:   # (_stop_status only where a stop is possible: at the length limit, or stop ids to match)
                ends = request.append_output_token(token) >= request.length_limit
                new_tokens, status = [token], stop_status(request) if ends or request.stop_ids else None
            if status is not None:
                self._finish(request, status)
            results.append((request, new_tokens))
        return results

    def _apply_spec(self, request: Request, sched: SchedulerOutput, runner_output: ModelRunnerOutput,
                    token: int) -> tuple[list[int], RequestStatus | None]:
        """A speculating step's tokens (cluster/core/spec.py); the slots of rejected proposals go back."""
        rid = request.request_id
        tokens = runner_output.accepted_token_ids.get(rid) or [token]
        num_drafts = len(sched.scheduled_spec_decode_tokens.get(rid, ()))
        new_tokens, status = self.spec.apply(request, tokens, num_drafts, self._stop_status)
        if status is None and request.status is RequestStatus.RUNNING:
            self.spec.propose(request, runner_output.draft_token_ids.get(rid))
            sent = self._sent.get(rid)
            kept = self.block_manager.trim(rid, request.num_computed_tokens)
            if sent is not None and kept < sent[1]:
                self._trimmed[rid] = min(kept, self._trimmed.get(rid, kept))
        return new_tokens, status

    def _stop_status(self, request: Request) -> RequestStatus | None:
        """Token-level stops after a new token (stop strings are the engine's job). Length first, as vLLM."""
        if len(request.all_token_ids) >= request.length_limit:   # (_ends_by_length, inline)
            return RequestStatus.FINISHED_LENGTH
        outputs = request.output_token_ids
        last = outputs[-1]
        if last not in request.stop_ids:
            return None
        params = request.sampling_params
        if len(outputs) < params.min_tokens:
            return None
        if last != params.eos_token_id or params.ignore_eos:   # eos stops with no stop_reason (vLLM)
            request.stop_reason = last
        return RequestStatus.FINISHED_STOPPED

    def _ends_by_length(self, request: Request, num_tokens: int) -> bool:
        """Whether the request ends by length once it holds `num_tokens` tokens (prompt + outputs)."""
        return num_tokens >= request.length_limit

    def _set_stops(self, request: Request) -> None:
        """Keep on the request what its stop checks read each step (its params never change once added):
        the token count at which it ends by length (max_model_len, or the prompt plus max_tokens) and the
        token ids that stop it (eos unless ignore_eos, and stop_token_ids)."""
        params = request.sampling_params
        limit = self.config.max_model_len
        if params.max_tokens is not None:
            limit = min(limit, request.num_prompt_tokens + params.max_tokens)
        request.length_limit = limit
        eos = () if params.ignore_eos or params.eos_token_id is None else (params.eos_token_id,)
        request.stop_ids = frozenset((*eos, *(params.stop_token_ids or ())))
