"""Speculative decoding on the driver: which proposals a step verifies, and what came of them.

Pure Python (no torch), owned by the `Scheduler`. A running request at its decode point carries
`spec_token_ids`, the proposals for the tokens after its last one; a step runs its last token and
those k proposals as k + 1 query tokens (they count in the token budget and get KV slots), and the
workers return 1 to k + 1 new tokens: the accepted prefix of the proposals and one token the target
chose (vLLM V1's shape). The rejected proposals' K/V slots are given back: the request's computed
tokens drop by their count, and blocks past its computed tokens go back to the block manager.

Proposals come from the n-gram lookup here (the request's own tokens; nothing to run on a device),
or from the workers' draft model / EAGLE head (`ModelRunnerOutput.draft_token_ids`).

Overlapped steps (async scheduling, vLLM V1's placeholders): step N+1 is scheduled before step N's
tokens are read. A request verifying k proposals in step N then holds 1 + k output placeholders
(as if every proposal were accepted) and its computed tokens count all k; step N+1 runs its next
token and up to k proposals whose ids the driver does not know: `spec_token_ids` holds placeholders
(-1), and the workers take the proposals they made in step N (the n-gram lookup then runs on the
workers too: it needs step N's tokens). The workers know step N's accepted count and place step
N+1's tokens after the accepted ones; when step N is read here, the rejected count is taken off the
computed tokens, as without the overlap. `in_flight` counts the proposals of unread steps, so a
request's placeholders less those are the outputs it certainly gets (one per step).

Back-off (cluster/core/spec_backoff.py): a request whose verifications keep accepting nothing stops
proposing for a while; the decision is made here and travels with the step (no proposals scheduled,
and `SchedulerOutput.spec_skip_draft_req_ids` for the workers' proposer).
"""
from __future__ import annotations

from typing import Callable

from pagedray.cluster.core.request import Request, RequestStatus
from pagedray.cluster.core.spec_backoff import SpecBackOff
from pagedray.common.speculative import SpeculativeConfig, ngram_propose

__all__ = ["SpecDecoding", "ngram_propose"]


def _no_stop_among(request: Request, tokens: list[int]) -> bool:
    """Whether appending `tokens` certainly hits no token-level stop (the scheduler's `_stop_status`:
    the length limit, and the stop ids it set with it); False sends them through the per-token check."""
    if request.length_limit is None or len(request.all_token_ids) + len(tokens) >= request.length_limit:
        return False
    return request.stop_ids.isdisjoint(tokens)


class SpecDecoding:
    """The scheduler's speculation state: drafts per step, acceptance counters (vLLM's metrics)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int, overlapped: bool = False) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.max_model_len = max_model_len
        self.num_lookahead_slots = config.num_lookahead_slots
        self.overlapped = overlapped
        self._placeholders = [-1] * self.k     # proposals the workers made in the step in flight
        self.in_flight: dict[str, int] = {}    # per request: proposals of its steps not read yet
        # vLLM's spec-decode counters: verification steps with proposals, proposals, accepted ones,
        # and the accepted count per proposal position.
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * self.k
        self.backoff = SpecBackOff(config.backoff_after_failed_steps, config.backoff_max_steps)

    def drafts_for(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The proposals a request verifies this step (cut to the budget and to its limits): only
        at its decode point (one token left to run), never mid-prefill. With a step in flight
        (overlapped steps) they are placeholders for the workers' own, and the limits count the
        step's outputs as if all its proposals were accepted."""
        drafts = request.spec_token_ids
        pending = request.num_output_placeholders
        if not drafts and pending and self.overlapped:
            drafts = request.spec_token_ids = self._placeholders
        if not drafts or num_new != 1:
            return []
        backoff = self.backoff
        if backoff.state and not backoff.wants_proposals(request.request_id,
                                                          self.in_flight.get(request.request_id, 0)):
            request.spec_token_ids = []   # (a pause: the prefill pacer counts no proposal rows)
            return []
        limit = min(len(drafts), budget - 1, self.max_model_len - request.num_tokens - pending)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:   # the verified tokens bring up to len(drafts) + 1 outputs
            limit = min(limit, max_tokens - request.num_output_tokens - pending - 1)
        return drafts[:max(0, limit)]

    def advance(self, request: Request, num_drafts: int) -> None:
        """A step verifying `num_drafts` proposals was scheduled: its outputs may count them all."""
        request.num_output_placeholders += num_drafts
        self.in_flight[request.request_id] = self.in_flight.get(request.request_id, 0) + num_drafts

    def apply(self, request: Request, tokens: list[int], num_drafts: int,
              stop_status: Callable[[Request], RequestStatus | None]) -> tuple[list[int], RequestStatus | None]:
        """Append a verification's tokens (accepted proposals + one more) up to the first stop.

        The K/V of rejected proposals is not kept: the request's computed tokens drop by their count.
        Returns the tokens appended and the stop status (None: still running).
        """
        accepted = len(tokens) - 1
        if num_drafts:
            self.backoff.verified(request.request_id, accepted)
            self.num_drafts += 1
            self.num_draft_tokens += num_drafts
            if accepted:
                self.num_accepted_tokens += accepted
                per_pos = self.num_accepted_tokens_per_pos
                for pos in range(accepted):
                    per_pos[pos] += 1
            request.num_output_placeholders -= num_drafts
            rid = request.request_id
            left = self.in_flight.pop(rid) - num_drafts
            if left:
                self.in_flight[rid] = left
        elif self.backoff.state:
            self.backoff.ran_plain(request.request_id)
        if request.status is RequestStatus.RUNNING:   # (preempted meanwhile: recomputed from 0)
            request.num_computed_tokens -= num_drafts - accepted
        request.spec_token_ids = []
        if _no_stop_among(request, tokens):   # the common case: all of them, without a check each
            request.append_output_tokens(tokens)
            return tokens, None
        for i, token in enumerate(tokens):
            request.append_output_token(token)
            status = stop_status(request)
            if status is not None:
                return tokens[:i + 1], status
        return tokens, None

    def propose(self, request: Request, worker_drafts: list[int] | None) -> None:
        """The proposals for the request's next step: the n-gram lookup, or the workers' drafts.
        Placeholders while another step of it is in flight (the workers hold that step's proposals;
        the prefill pacer counts them as rows of the next step)."""
        paused = bool(self.backoff.state) and self.backoff.paused(request.request_id)
        if request.num_output_placeholders:
            request.spec_token_ids = self._placeholders if self.overlapped and not paused else []
            return
        if paused:
            request.spec_token_ids = []    # (no lookup either)
        elif self.config.method == "ngram" and not self.overlapped:
            request.spec_token_ids = self.lookup(request)
        else:
            request.spec_token_ids = list(worker_drafts or ())

    def lookup(self, request: Request) -> list[int]:
        """The n-gram lookup's proposals for the request's next step (serial steps)."""
        cfg = self.config
        return ngram_propose(request.all_token_ids, cfg.prompt_lookup_min, cfg.prompt_lookup_max, self.k)

    def skip_drafting(self, scheduled: dict[str, int]) -> set[str]:
        """Scheduled requests whose next step certainly verifies nothing (a pause): the workers'
        proposer (drafter, or the n-gram lookup of overlapped steps) skips them this step."""
        backoff = self.backoff
        if not backoff.state:
            return set()
        return {rid for rid in backoff.state if rid in scheduled and backoff.skips_drafting(rid)}

    def stats(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos),
                "spec_num_backed_off_steps": self.backoff.num_backed_off_steps}
