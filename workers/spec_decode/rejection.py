"""Verification of proposals against the target's logits: greedy prefix match, or rejection sampling.

Every proposer here proposes greedily, so the draft distribution q of a proposal d is one-hot on d.
Rejection sampling (Leviathan et al.; Chen et al.) then reads: accept d with probability p(d), where
p is the target's distribution at that position after the request's own processing (penalties
counting the earlier proposals as outputs, min_tokens, temperature, min-p, top-k, top-p — the
non-speculative sampler's functions); at the first rejection draw from p with d removed
(renormalised max(p - q, 0)); after k acceptances draw a bonus token from the last row's p.

With a one-hot q that is the same as drawing t from p at every position and accepting d while
t == d: t == d has probability p(d), and a t != d is distributed as p with d removed. So each row
draws t exactly as the non-speculative sampler would (its exponential race, with the noise of the
row's output position) and the step emits the accepted proposals and then the first t that differs
(or the bonus row's t). Each emitted token is then distributed exactly as the target's own sampler
draws it, and a seeded request (noise from (seed, output position)) emits the tokens it would emit
without speculation, whatever was proposed, whatever the batch, preemption or overlap of steps did.
Greedy rows are the case p = one-hot(argmax). The host waits once per step, for all rows together.
"""
from __future__ import annotations

import copy

import torch

from pagedray.common.messages import Logprobs
from pagedray.workers.sampler import (Sampler, SamplingRow, apply_penalties, filtered_probs, logprob_entries,
                                      mask_min_tokens, to_device)
from pagedray.workers.step_output import HostCopy


def expand_rows(rows: list[SamplingRow], groups: list[tuple[str, int, list[int]]]) -> list[SamplingRow]:
    """One sampling row per logits row: row j of a request sees its proposals before j as outputs."""
    out: list[SamplingRow] = []
    for row, (_, _, drafts) in zip(rows, groups):
        out.append(row)
        for j in range(1, len(drafts) + 1):
            view = copy.copy(row)
            view.num_pending = row.num_pending + j
            if row.has_penalty:
                view.pending_token_ids = row.pending_token_ids + drafts[:j]
            out.append(view)
    return out


def verify(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow],
           groups: list[tuple[str, int, list[int]]]) -> tuple[list[list[int]], list[list[Logprobs] | None]]:
    """Per group: the tokens the step emits (accepted proposals, then one of the target's), and their
    logprobs when asked. `logits` [sum(k + 1), V]: each group's rows in order, the last one the bonus."""
    if _all_argmax(rows):
        return _accept_prefix(_greedy_ids(sampler, logits, rows, groups).tolist(), groups), [None] * len(groups)
    erows = expand_rows(rows, groups)
    dev = logits.device
    logits = logits.float()
    if any(r.constrained for r in rows):
        # Grammar masks per verified position and logit biases, before anything reads the logits
        # (the sampler's order); the sampler's own hook would mask every row alike.
        logits = sampler.constraints.speculative(logits, erows, groups)
    want = [r.params.logprobs for r in erows]
    raw_lp = torch.log_softmax(logits, dim=-1) if any(w is not None for w in want) else None
    if any(r.has_penalty or r.masks_min_tokens for r in erows):
        logits = mask_min_tokens(apply_penalties(logits.clone(), erows), erows)
    proposal = []           # each row's proposal to judge (-1: the bonus row)
    for _, _, drafts in groups:
        proposal += drafts + [-1]
    prop = to_device(proposal, torch.int64, dev)
    greedy = [r.params.greedy for r in erows]
    chosen = logits.argmax(dim=-1)
    if not all(greedy):   # every row's own draw, as the sampler's (`_general`) for that position
        probs = filtered_probs(logits, erows)
        drawn = (probs / sampler._noise(probs, erows)).argmax(dim=-1)
        chosen = torch.where(to_device(greedy, torch.bool, dev), chosen, drawn)
    accept = chosen == prop
    host = torch.stack([chosen, accept.long()]).tolist()     # the step's one wait for the device
    tokens: list[list[int]] = []
    lp_rows: list[int] = []
    lp_ids: list[int] = []
    lp_want: list[int | None] = []
    for (_, row0, drafts), row in zip(groups, rows):
        a = 0
        while a < len(drafts) and host[1][row0 + a]:
            a += 1
        out = drafts[:a] + [host[0][row0 + a]]
        tokens.append(out)
        if row.params.logprobs is not None:
            lp_rows += range(row0, row0 + a + 1)
            lp_ids += out
            lp_want += [row.params.logprobs] * (a + 1)
    return tokens, _logprobs(raw_lp, groups, rows, tokens, lp_rows, lp_ids, lp_want)


class LaterTokens:
    """`verify`'s result, read when called. An all-greedy step's argmax per logits row stays on the
    device (`chosen`: the next step's inputs may gather from it there) and travels to pinned host
    memory in a non-blocking copy behind an event, so reading it waits for this step only, not for
    work queued since; other steps were verified at once (`chosen` None)."""

    def __init__(self, groups, chosen: torch.Tensor | None = None, result=None) -> None:
        self.groups, self.chosen, self._result = groups, chosen, result
        self._host = HostCopy(chosen) if chosen is not None else None

    def __call__(self) -> tuple[list[list[int]], list]:
        if self._result is None:
            self._result = (_accept_prefix(self._host.tolist(), self.groups), [None] * len(self.groups))
        return self._result


def verify_later(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow],
                 groups: list[tuple[str, int, list[int]]]) -> LaterTokens:
    """`verify`, with the host's one wait for the device deferred to the returned call where the
    step is all greedy (its argmax is queued now and read later: the host's work in between runs
    while the forward does); other steps are verified now."""
    if not _all_argmax(rows):
        return LaterTokens(groups, result=verify(sampler, logits, rows, groups))
    return LaterTokens(groups, _greedy_ids(sampler, logits, rows, groups))


def _all_argmax(rows: list[SamplingRow]) -> bool:
    return all(r.argmax_only and not r.masks_min_tokens and not r.constrained for r in rows)


def _greedy_ids(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow],
                groups: list[tuple[str, int, list[int]]]) -> torch.Tensor:
    """The common all-greedy step: the sampler's argmax pass (its fastest on the device), queued.
    (Past min_tokens at its first row, a row is past it at the later ones: no per-row views.)"""
    same = [row for row, (_, _, drafts) in zip(rows, groups) for _ in range(len(drafts) + 1)]
    return sampler.sample(logits, same).token_ids


def _accept_prefix(chosen: list[int], groups: list[tuple[str, int, list[int]]]) -> list[list[int]]:
    """Per group: its proposals while they equal the argmax, then the first argmax that differs."""
    tokens = []
    for _, row0, drafts in groups:
        a = 0
        while a < len(drafts) and chosen[row0 + a] == drafts[a]:
            a += 1
        tokens.append(drafts[:a] + [chosen[row0 + a]])
    return tokens


def _logprobs(raw_lp, groups, rows, tokens, lp_rows, lp_ids, lp_want) -> list[list[Logprobs] | None]:
    """The raw logprobs (before any processing, as the sampler reports them) of each emitted token."""
    out: list[list[Logprobs] | None] = [None] * len(groups)
    if raw_lp is None or not lp_rows:
        return out
    dev = raw_lp.device
    entries = logprob_entries(raw_lp[to_device(lp_rows, torch.int64, dev)],
                              to_device(lp_ids, torch.int64, dev), lp_want)
    i = 0
    for g, row in enumerate(rows):
        if row.params.logprobs is not None:
            n = len(tokens[g])
            out[g] = entries[i:i + n]
            i += n
    return out
