"""Speculative decoding on the driver: which proposals a step verifies, and what came of them.

Pure Python (no torch), owned by the `Scheduler`. A running request at its decode point carries
`spec_token_ids`, the proposals for the tokens after its last one; a step runs its last token and
those k proposals as k + 1 query tokens (they count in the token budget and get KV slots), and the
workers return 1 to k + 1 new tokens: the accepted prefix of the proposals and one token the target
chose (vLLM V1's shape). The rejected proposals' K/V slots are given back: the request's computed
tokens drop by their count, and blocks past its computed tokens go back to the block manager.

Proposals come from the n-gram lookup here (the request's own tokens; nothing to run on a device),
or from the workers' draft model / EAGLE head (`ModelRunnerOutput.draft_token_ids`).
"""
from __future__ import annotations

from typing import Callable

from pagedray.cluster.core.request import Request, RequestStatus
from pagedray.common.speculative import SpeculativeConfig


def ngram_propose(tokens: list[int], lookup_min: int, lookup_max: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    (between lookup_min and lookup_max tokens long) — prompt lookup decoding. [] when none matches."""
    n = len(tokens)
    if n < lookup_min + 1:
        return []
    last = tokens[-1]
    best_len, best_end = 0, -1
    # Scan right to left for earlier occurrences of the last token, then grow each match leftwards:
    # the first match of full length wins (the most recent), else the longest one seen.
    i = n - 2
    while i >= 0:
        if tokens[i] == last:
            m = 1
            while m < lookup_max and i - m >= 0 and tokens[i - m] == tokens[n - 1 - m]:
                m += 1
            if m > best_len:
                best_len, best_end = m, i
                if m == lookup_max:
                    break
        i -= 1
    if best_len < lookup_min:
        return []
    return tokens[best_end + 1:best_end + 1 + k]


class SpecDecoding:
    """The scheduler's speculation state: drafts per step, acceptance counters (vLLM's metrics)."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.max_model_len = max_model_len
        self.num_lookahead_slots = config.num_lookahead_slots
        # vLLM's spec-decode counters: verification steps with proposals, proposals, accepted ones,
        # and the accepted count per proposal position.
        self.num_drafts = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * self.k

    def drafts_for(self, request: Request, num_new: int, budget: int) -> list[int]:
        """The proposals a request verifies this step (cut to the budget and to its limits): only
        at its decode point (one token left to run), never mid-prefill."""
        drafts = request.spec_token_ids
        if not drafts or num_new != 1:
            return []
        limit = min(len(drafts), budget - 1, self.max_model_len - request.num_tokens)
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:   # the verified tokens bring up to len(drafts) + 1 outputs
            limit = min(limit, max_tokens - request.num_output_tokens - 1)
        return drafts[:max(0, limit)]

    def apply(self, request: Request, tokens: list[int], num_drafts: int,
              stop_status: Callable[[Request], RequestStatus | None]) -> tuple[list[int], RequestStatus | None]:
        """Append a verification's tokens (accepted proposals + one more) up to the first stop.

        The K/V of rejected proposals is not kept: the request's computed tokens drop by their count.
        Returns the tokens appended and the stop status (None: still running).
        """
        accepted = len(tokens) - 1
        if num_drafts:
            self.num_drafts += 1
            self.num_draft_tokens += num_drafts
            self.num_accepted_tokens += accepted
            for pos in range(accepted):
                self.num_accepted_tokens_per_pos[pos] += 1
        request.num_computed_tokens -= num_drafts - accepted
        request.spec_token_ids = []
        for i, token in enumerate(tokens):
            request.append_output_token(token)
            status = stop_status(request)
            if status is not None:
                return tokens[:i + 1], status
        return tokens, None

    def propose(self, request: Request, worker_drafts: list[int] | None) -> None:
        """The proposals for the request's next step: the n-gram lookup, or the workers' drafts."""
        if self.config.method == "ngram":
            cfg = self.config
            request.spec_token_ids = ngram_propose(request.all_token_ids, cfg.prompt_lookup_min,
                                                   cfg.prompt_lookup_max, self.k)
        else:
            request.spec_token_ids = list(worker_drafts or ())

    def stats(self) -> dict:
        return {"spec_num_drafts": self.num_drafts, "spec_num_draft_tokens": self.num_draft_tokens,
                "spec_num_accepted_tokens": self.num_accepted_tokens,
                "spec_num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos)}
