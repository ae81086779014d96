"""The one rule for every check of greedy outputs against a reference (HF transformers, or TP=1).

Two correct fp32 implementations sum in different orders, so where the top two tokens are within
rounding of each other either may win. The rule therefore is:
- tokens are equal up to the first divergence, and each equal token's logprob is within `atol`;
- at a divergence only a near-tie is accepted: each side's token is in the other's top-2 and, on each
  side, the two tokens' logprobs differ by at most `tie`; after it the continuations are conditioned on
  different tokens, so nothing further is compared;
- without a divergence the lengths must be equal.
A wrong weight moves logits by far more than `tie`, so it still fails at its first token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ATOL = 1e-4   # logprobs of equal tokens, fp32
TIE = 1e-3    # largest top-2 logprob gap treated as a tie, fp32


@dataclass(frozen=True)
class Greedy:
    """A greedy continuation: its tokens and, per step, {token: logprob} holding at least the top-2."""
    tokens: list[int]
    steps: list[dict[int, float]]


def top_steps(logits: torch.Tensor, chosen: list[int] | None = None, k: int = 2) -> list[dict[int, float]]:
    """Per row of `logits` [T, V]: the top-k tokens' logprobs (and the chosen token's, if given)."""
    logprobs = torch.log_softmax(logits.float(), -1)
    values, ids = logprobs.topk(k, -1)
    steps = [dict(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)]
    for step, row, t in zip(steps, logprobs, chosen or []):
        step[t] = row[t].item()
    return steps


def engine_greedy(completion) -> Greedy:
    """A CompletionOutput generated with logprobs >= 2 (the chosen token plus the top-2 per step)."""
    assert completion.logprobs is not None, "ask the engine for logprobs=2"
    return Greedy(list(completion.token_ids), [dict(s) for s in completion.logprobs])


def _top2(step: dict[int, float]) -> list[int]:
    return sorted(step, key=step.get, reverse=True)[:2]


def is_near_tie(ours: int, our_step: dict[int, float], ref: int, ref_step: dict[int, float],
                tie: float = TIE) -> bool:
    """Tokens `ours` != `ref` at one step: each in the other's top-2, each side's two within `tie`."""
    if ref not in _top2(our_step) or ours not in _top2(ref_step):
        return False
    return abs(our_step[ours] - our_step[ref]) <= tie and abs(ref_step[ref] - ref_step[ours]) <= tie


def greedy_mismatch(ours: Greedy, ref: Greedy, atol: float = ATOL, tie: float = TIE) -> str | None:
    """Why `ours` breaks the rule against `ref`, or None when it keeps it."""
    for i, (a, b) in enumerate(zip(ours.tokens, ref.tokens)):
        sa, sb = ours.steps[i], ref.steps[i]
        if a != b:
            if is_near_tie(a, sa, b, sb, tie):
                return None
            return (f"step {i}: token {a} vs reference {b}, not a near-tie (ours {_show(sa)}, "
                    f"reference {_show(sb)}, bound {tie})")
        if abs(sa[a] - sb[b]) > atol:
            return f"step {i}: token {a} logprob {sa[a]:.7f} vs reference {sb[b]:.7f} (atol {atol})"
    if len(ours.tokens) != len(ref.tokens):
        return f"{len(ours.tokens)} tokens vs reference {len(ref.tokens)}: {ours.tokens} vs {ref.tokens}"
    return None


def assert_greedy_match(ours: Greedy, ref: Greedy, atol: float = ATOL, tie: float = TIE, what: str = "") -> None:
    reason = greedy_mismatch(ours, ref, atol, tie)
    assert reason is None, f"{what}: {reason}\n  ours      {ours.tokens}\n  reference {ref.tokens}"


def argmax_mismatch(got: torch.Tensor, ref: torch.Tensor, tie: float = TIE) -> str | None:
    """Teacher-forced logits [T, V]: every row's argmax equal, or a near-tie (rows are independent)."""
    ours, theirs = got.argmax(-1).tolist(), ref.argmax(-1).tolist()
    our_steps, ref_steps = top_steps(got), top_steps(ref)
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b and not is_near_tie(a, our_steps[i], b, ref_steps[i], tie):
            return (f"row {i}: argmax {a} vs reference {b}, not a near-tie "
                    f"({_show(our_steps[i])} vs {_show(ref_steps[i])})")
    return None


def _show(step: dict[int, float]) -> str:
    return "{" + ", ".join(f"{t}: {step[t]:.7f}" for t in _top2(step)) + "}"
