"""The model runner's speculative step: verify the scheduled proposals, then let a drafter propose.

`ModelRunner.execute_model_async` hands a step here when it verifies proposals, or always when a
drafter (draft model / EAGLE head) runs: the drafter must see every token the target computes.
The target's forward is the runner's own (`_forward`: a decode-graph replay when the step is
verifications and decodes only); the step waits for the device once, for the verified tokens, and
the drafter's k proposals stay on the device (`Drafts`) until the next step's inputs or the step's
output read them. Without a drafter nothing in the step needs the verified tokens, so the wait comes
later (`_Pending`): when the driver reads the step or the next step begins — with overlapped steps
the driver's reading of the previous step and its scheduling of the next then run during the forward.

This worker appends each step's emitted tokens to its requests at once (the driver's next delta
then repeats them: `unseen` drops those), so its state always ends with the verified tokens.
Overlapped steps (async scheduling; cluster/core/spec.py): the driver schedules step N+1 before it
reads step N, counting step N's proposals as accepted and sending placeholders (-1) for step N+1's
proposals. Here step N's emitted tokens and rejected count are known (`_unread`, until a delta
shows the driver read them): step N+1's tokens start after the accepted ones (`after_update`
lowers the driver's computed count by the rejected ones) and its proposals are this worker's own
from step N (`own_drafts`; the n-gram lookup then runs here). A drafter's proposals are gathered into step N+1's
input ids on the device and read to the host only once step N+1's forward is queued, so the host's
work between the steps (the driver's scheduling of step N+1, its reading of step N - 1, this
worker's input building) runs while the drafter's forwards do.
"""
from __future__ import annotations

from collections import deque
from operator import itemgetter
from typing import NamedTuple

import torch

from pagedray.common.messages import ModelRunnerOutput, SchedulerOutput
from pagedray.common.speculative import SpeculativeConfig, ngram_propose
from pagedray.kernels import ops
from pagedray.workers.spec_decode.inputs import build_spec_inputs
from pagedray.workers.spec_decode.rejection import LaterTokens, verify, verify_later
from pagedray.workers.spec_decode.tensor_parallel import share_verified
from pagedray.workers.step_output import HostCopy, StepOutput, StepTimer


class _Emitted(NamedTuple):
    """A step's tokens for one request, appended here before the driver has read them (a tuple:
    one is made per request per step)."""
    tokens: list[int]
    rejected: int      # its proposals that were not accepted


_REJECTED = itemgetter(1)


class Drafts:
    """One step's proposals per request: a drafter's [requests, k] tensor on the device, or host
    lists (the n-gram lookup). On CUDA the tensor travels to pinned host memory in a non-blocking
    copy behind an event, so reading it waits for the drafter's forwards only, not for the work
    queued since (the next step's forward)."""

    def __init__(self, req_ids: list[str], tensor: torch.Tensor | None = None, limits: list[int] | None = None,
                 lists: list[list[int]] | None = None) -> None:
        self.req_ids, self._tensor, self._limits, self._lists = req_ids, tensor, limits, lists
        self._host: dict[str, list[int]] | None = None
        self._rows: dict[str, int] | None = None
        self._copy = HostCopy(tensor) if tensor is not None else None

    def device_row(self, req_id: str, n: int) -> int | None:
        """The request's row of the device tensor when it holds n proposals for it and is not read yet."""
        if self._tensor is None or self._tensor.shape[1] < n:
            return None
        if self._rows is None:
            self._rows = {rid: i for i, rid in enumerate(self.req_ids)}
        i = self._rows.get(req_id)
        return i if i is not None and self._limits[i] >= n else None

    def host(self) -> dict[str, list[int]]:
        if self._host is None:
            rows = self._lists if self._lists is not None else self._copy.tolist()
            limits = self._limits or [len(r) for r in rows]
            self._host = {rid: row[:max(0, limit)] for rid, row, limit in zip(self.req_ids, rows, limits)}
            self._tensor = self._copy = None
        return self._host


def _drop_read_steps(unread: deque, n: int) -> int:
    """Forget the oldest unread steps that `n` tokens the driver sent cover whole; the tokens left over."""
    while unread and n >= len(unread[0].tokens):
        n -= len(unread.popleft().tokens)
    return n


class _Pending:
    """A step without a drafter whose verified tokens are still on the device: the host reads them
    (and appends them, and looks up the n-gram proposals) when the driver reads the step or when
    the next step begins, whichever comes first — so the host's work in between (the driver's
    output reading and scheduling) runs while the target's forward does.

    A step that verified nothing (every request plain, e.g. its speculation backed off) followed
    by a step that verifies nothing either is not read when the next step begins (overlapped
    steps): each request's next input token is the step's argmax, gathered on the device
    (`SpecDecodeRunner.before_update`), and the next step's read runs this one's first (`prev`)."""

    def __init__(self, spec: "SpecDecodeRunner", runner, groups, sched: SchedulerOutput,
                 finish: LaterTokens, out: ModelRunnerOutput) -> None:
        self.spec, self.runner, self.groups, self.sched = spec, runner, groups, sched
        self.finish, self.out = finish, out
        self.chosen = finish.chosen     # the argmax per logits row on the device (None: read already)
        # Nothing scheduled to verify (as the driver counts: placeholders this worker had no proposal
        # for are rejections, which move the next step's positions).
        self.plain = not sched.scheduled_spec_decode_tokens
        self.prev: _Pending | None = None   # an earlier step not read yet
        self._rows: dict[str, int] | None = None

    def rows(self) -> dict[str, int]:
        """Each request's logits row (asked by `_can_defer`, then by the next step's inputs)."""
        if self._rows is None:
            self._rows = {rid: row0 for rid, row0, _ in self.groups}
        return self._rows

    def run(self) -> None:
        if self.finish is None:
            return
        if self.prev is not None:   # (its tokens come first)
            prev, self.prev = self.prev, None
            prev.run()
        finish, self.finish = self.finish, None
        spec, groups = self.spec, self.groups
        tokens, logprobs = finish()   # the step's one wait for the device
        spec._fill(self.out, groups, tokens, logprobs)
        spec.emitted(self.runner, groups, tokens, self.sched.scheduled_spec_decode_tokens)
        drafts = spec._lookup(self.runner, groups, self.sched)
        spec._drafts = drafts
        if drafts is not None:
            self.out.draft_token_ids = drafts.host()
        if spec._pending is self:
            spec._pending = None


class _SpecStepOutput(StepOutput):
    """The step's output; its proposals (and its time, for prefill pacing) are read from the device
    when it is read, not when the step is queued."""

    def __init__(self, output: ModelRunnerOutput, drafts: Drafts | None, timer: StepTimer | None,
                 pending: _Pending | None = None) -> None:
        super().__init__([], None)
        self._result, self._drafts, self._timer, self._pending = output, drafts, timer, pending
        if timer is not None:
            timer.stop()   # (after everything the step queued, the drafter's forwards included)

    def get(self) -> ModelRunnerOutput:
        if self._pending is not None:
            self._pending.run()
            self._pending = None
        if self._drafts is not None:
            self._result.draft_token_ids = self._drafts.host()
            self._drafts = None
        if self._timer is not None:
            self._result.step_time_s = self._timer.seconds()
            self._timer = None
        return self._result


class SpecDecodeRunner:
    def __init__(self, config: SpeculativeConfig, drafter=None) -> None:
        self.config = config
        self.drafter = drafter
        self.num_steps = 0     # speculative steps run (tests read it)
        # Set by the executor when the driver overlaps steps (async scheduling): every step runs here
        # and proposes (the n-gram lookup too), for the driver's placeholders.
        self.overlapped = False
        self._unread: dict[str, deque[_Emitted]] = {}
        self._resent: dict[str, list[int]] = {}
        self._drafts: Drafts | None = None   # the last step's proposals
        self._pending: _Pending | None = None   # the last step, its verified tokens not read yet
        # The last step when this one gathers its input tokens from it on the device (not read yet).
        self._deferred: _Pending | None = None

    def handles(self, sched: SchedulerOutput) -> bool:
        return self.drafter is not None or self.overlapped or bool(sched.scheduled_spec_decode_tokens)

    # -- the tokens this worker appended before the driver read them ----------------------------------
    def before_update(self, runner, sched: SchedulerOutput) -> None:
        """The last step's verified tokens first (`_Pending`). Requests the driver drops: forget their
        unread tokens, unless it resends them whole in the same step (copy-on-write replaced a block):
        then keep their tokens for `after_update`."""
        self._deferred = None
        if self._pending is not None:
            if self._can_defer(self._pending, sched):
                self._deferred = self._pending
            else:
                self._pending.run()
        if not self._unread or not sched.finished_req_ids:
            return
        resent = {new.req_id for new in sched.scheduled_new_reqs}
        for rid in sched.finished_req_ids:
            if rid in self._unread:
                if rid in resent and rid in runner.requests:
                    self._resent[rid] = list(runner.requests[rid].token_ids)
                else:
                    del self._unread[rid]

    def _can_defer(self, pending: _Pending, sched: SchedulerOutput) -> bool:
        """Whether this step may start before the last one is read: both verify nothing, and this
        one runs one token of each of the last step's requests (so every position is known and
        each input token is the last step's argmax, on the device)."""
        if not (self.overlapped and pending.plain and pending.chosen is not None
                and (pending.prev is None or pending.prev.finish is None)   # (one unread step at most)
                and not sched.scheduled_spec_decode_tokens and not sched.finished_req_ids
                and not sched.scheduled_new_reqs and self.drafter is None
                and sched.total_num_scheduled_tokens == len(sched.num_scheduled_tokens)):
            return False
        rows = pending.rows()
        return all(rid in rows for rid in sched.num_scheduled_tokens)

    def deferred_rows(self) -> tuple[dict[str, int], torch.Tensor] | None:
        """(request -> its row, the argmax per row on the device) of the unread last step whose
        tokens are this step's inputs, or None."""
        d = self._deferred
        return (d.rows(), d.chosen) if d is not None else None

    def unseen(self, req_id: str, new_token_ids: list[int]) -> list[int]:
        """A delta's tokens not already appended here (those of the steps the driver read since)."""
        unread = self._unread.get(req_id)
        if not unread:
            return new_token_ids
        n = _drop_read_steps(unread, len(new_token_ids))
        if not unread:
            del self._unread[req_id]
        elif n:
            raise RuntimeError(f"request {req_id!r}: the driver sent {len(new_token_ids)} tokens, "
                               "not whole steps of those this worker emitted")
        return new_token_ids[len(new_token_ids) - n:] if n else []

    def after_update(self, runner, sched: SchedulerOutput) -> None:
        """Place this step after the accepted tokens of the steps the driver has not read."""
        if not self._unread:
            return
        for new in sched.scheduled_new_reqs:
            old = self._resent.pop(new.req_id, None)
            if old is not None:   # resent whole: the driver's tokens, then the unread ones again
                unread = self._unread[new.req_id]
                _drop_read_steps(unread, len(new.token_ids) - (len(old) - sum(len(e.tokens) for e in unread)))
                runner.requests[new.req_id].append_tokens(old[len(new.token_ids):])
        get, requests = self._unread.get, runner.requests
        for rid in sched.num_scheduled_tokens:
            unread = get(rid)
            if unread:
                requests[rid].num_computed_tokens -= sum(map(_REJECTED, unread))

    def emitted(self, runner, groups, tokens: list[list[int]], scheduled: dict[str, list[int]]) -> None:
        """Append each sampling request's emitted tokens here now (its `_unread` until the driver's
        delta shows it read them); `groups` as `verify` takes them, `scheduled` the step's
        proposals as the driver counts them (placeholders this worker had none for count as rejected)."""
        requests, unread, get = runner.requests, self._unread, scheduled.get
        for (rid, _, _), toks in zip(groups, tokens):
            requests[rid].append_tokens(toks)
            # (a plain tuple: _Emitted's fields, without its constructor's Python frame)
            entry = tuple.__new__(_Emitted, (toks, len(get(rid, ())) + 1 - len(toks)))
            steps = unread.get(rid)
            if steps is None:
                unread[rid] = deque((entry,))
            else:
                steps.append(entry)

    def device_draft_row(self, req_id: str, n: int) -> int | None:
        return self._drafts.device_row(req_id, n) if self._drafts is not None else None

    def device_drafts(self) -> torch.Tensor:
        return self._drafts._tensor

    def host_drafts(self) -> dict[str, list[int]] | None:
        """The last step's proposals on the host when they are host lists (the n-gram lookup's), else None."""
        drafts = self._drafts
        return drafts.host() if drafts is not None and drafts._lists is not None else None

    def own_drafts(self, req_id: str, n: int) -> list[int]:
        """Up to n proposals for the driver's placeholders: this worker's from the last step."""
        return self._drafts.host().get(req_id, [])[:n] if self._drafts is not None else []

    @property
    def has_draft_graphs(self) -> bool:
        from pagedray.workers.spec_decode.drafter import ModelDrafter
        return isinstance(self.drafter, ModelDrafter)

    @property
    def draft_bytes_per_block(self) -> int:
        """KV bytes per block the drafter adds (its cache has as many blocks as the target's)."""
        return self.drafter.kv_spec.bytes_per_block if self.drafter is not None else 0

    def allocate_cache(self, num_blocks: int, device) -> None:
        if self.drafter is not None:
            from pagedray.workers.cache_engine import CacheEngine
            self.drafter.kv_caches = CacheEngine(self.drafter.kv_spec, num_blocks, device).kv_caches

    def drafter_end_step(self) -> None:
        if self.drafter is not None:
            self.drafter.end_step()

    @property
    def needs_eager_target(self) -> bool:
        return self.drafter is not None and self.drafter.needs_eager_target

    def capture_graphs(self, max_num_seqs: int, max_seq_len: int, block_size: int, device) -> None:
        """Decode graphs for a draft model's catch-up and propose steps (an EAGLE head runs eagerly)."""
        if self.has_draft_graphs:
            from pagedray.workers.cuda_graphs import DecodeGraphs, graph_batch_sizes
            # Up to k + 2 catch-up rows per sequence (its verified tokens and the new one).
            rows = graph_batch_sizes(max_num_seqs * (self.config.num_speculative_tokens + 2))
            graphs = DecodeGraphs(self.drafter.model, self.drafter.kv_caches, rows, max_seq_len, block_size, device)
            graphs.capture()
            self.drafter.graphs = graphs

    def copy_blocks(self, src_to_dst: list[tuple[int, int]]) -> None:
        """Copy-on-write reaches the drafter's KV cache too (it shares the target's block ids)."""
        if self.drafter is not None and self.drafter.kv_caches:
            ops.copy_blocks(self.drafter.kv_caches, src_to_dst)

    def execute(self, runner, sched: SchedulerOutput, timer: StepTimer | None = None) -> StepOutput:
        self.num_steps += 1
        inputs = build_spec_inputs(runner, sched)
        deferred, self._deferred = self._deferred, None
        if runner.lora is not None:
            # Every row carries its request's adapter: a verification's k + 1 pseudo-sequences too.
            # (The drafter runs without adapters: a draft model is the base draft, as in vLLM, and an
            # EAGLE head reads the target's hidden states, which include the adapter.)
            runner.lora.set_step([runner.requests[rid].lora_request for rid, _, _, _ in inputs.spans],
                                 [n for _, _, n, _ in inputs.spans])
        if self.needs_eager_target:
            # EAGLE-3 reads target layers through hooks, which a graph replay does not run.
            hidden = runner.model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.attn_metadata)
        else:
            hidden = runner._forward(inputs)
        for g, n in inputs.deferred:   # the last step's proposals to the host, now that the forward is queued
            rid, row0, _ = inputs.groups[g]
            inputs.groups[g] = (rid, row0, self.own_drafts(rid, n))
        prompt_logprobs = runner._prompt_logprobs(hidden, inputs.prompt_spans)
        groups = inputs.groups
        tokens: list[list[int]] = []
        out = ModelRunnerOutput({}, prompt_logprobs=prompt_logprobs)
        if groups:
            every_row = len(inputs.logits_rows) == inputs.num_tokens    # (then they are all, in order)
            logits = runner.model.compute_logits(hidden if every_row else hidden[inputs.logits_rows])
            if not runner.sample and self.drafter is None:
                return _SpecStepOutput(ModelRunnerOutput({}), None, timer)
            if runner.sample:
                rows = [runner.requests[rid].sampling_row for rid, _, _ in groups]
                if self.drafter is None:   # nothing waits for the verified tokens: read them later
                    pending = _Pending(self, runner, groups, sched,
                                       verify_later(runner.sampler, logits, rows, groups), out)
                    pending.prev = deferred
                    self._drafts, self._pending = None, pending
                    return _SpecStepOutput(out, None, timer, pending)
                tokens, logprobs = verify(runner.sampler, logits, rows, groups)
                self._fill(out, groups, tokens, logprobs)
            if self.drafter is not None:   # every TP rank's drafter catches up on the sampling rank's tokens
                tokens = share_verified(tokens if runner.sample else None, len(groups),
                                        self.config.num_speculative_tokens + 1, hidden.device)
        if deferred is not None:   # (its tokens before this step's; such a step is a _Pending's anyway)
            deferred.run()
        drafts = None
        if self.drafter is not None:
            accepted = {rid: toks for (rid, _, _), toks in zip(groups, tokens)}
            with torch.inference_mode():
                # (requests whose speculation is backed off get no proposals: the driver says so)
                proposed = self.drafter.propose(runner, inputs, hidden, accepted, sched.spec_skip_draft_req_ids)
            drafts = Drafts(*proposed) if proposed is not None else None
            if not runner.sample:   # another TP rank: its shards of the drafter's forwards ran; rank 0 reports
                return _SpecStepOutput(ModelRunnerOutput({}), None, timer)
        self.emitted(runner, groups, tokens, sched.scheduled_spec_decode_tokens)
        if self.drafter is None:
            drafts = self._lookup(runner, groups, sched)
        self._drafts = drafts
        return _SpecStepOutput(out, drafts, timer)

    @staticmethod
    def _fill(out: ModelRunnerOutput, groups, tokens: list[list[int]], logprobs: list) -> None:
        for (rid, _, _), toks, lp in zip(groups, tokens, logprobs):
            out.sampled_token_ids[rid] = toks[0]
            out.accepted_token_ids[rid] = toks
            if lp is not None:
                out.accepted_logprobs[rid] = lp

    def _lookup(self, runner, groups, sched: SchedulerOutput) -> Drafts | None:
        """The worker's n-gram proposals for the next step (overlapped steps only), but for the
        requests whose speculation the driver backed off."""
        if not (self.overlapped and self.config.method == "ngram" and groups):
            return None
        skip = sched.spec_skip_draft_req_ids
        return self._ngram(runner, [g for g in groups if g[0] not in skip] if skip else groups)

    def _ngram(self, runner, groups) -> Drafts:
        """The n-gram lookup over each request's tokens (its new ones included), for the next step."""
        cfg, k, lists = self.config, self.config.num_speculative_tokens, []
        for rid, _, _ in groups:
            # (uncut: the driver cuts the proposals it schedules to max_model_len and max_tokens)
            lists.append(ngram_propose(runner.requests[rid].token_ids, cfg.prompt_lookup_min,
                                       cfg.prompt_lookup_max, k))
        return Drafts([rid for rid, _, _ in groups], lists=lists)
