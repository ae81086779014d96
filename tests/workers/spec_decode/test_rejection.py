"""The rejection sampler against the exact target distribution: for known logits and proposals, the
first emitted token must be distributed as the processed target p (goodness of fit over many rows in
one call), the accepted fraction must be p(proposal), and greedy rows follow the argmax."""
from __future__ import annotations

import pytest
import torch

from pagedray.common.sampling_params import SamplingParams
from pagedray.workers.sampler import Sampler, SamplingRow, filtered_probs
from pagedray.workers.spec_decode.rejection import verify

VOCAB = 12
ROWS = 20000


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


def _run(params: SamplingParams, logits_row: torch.Tensor, drafts: list[int], outputs: list[int] | None = None):
    rows = [SamplingRow(params, [1, 2, 3], list(outputs or [])) for _ in range(ROWS)]
    k = len(drafts)
    logits = logits_row.repeat(ROWS, 1) if logits_row.dim() == 1 else logits_row.repeat(ROWS, 1)
    groups = [(f"r{i}", i * (k + 1), list(drafts)) for i in range(ROWS)]
    return verify(Sampler(seed=5), logits, rows, groups)[0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5),
], ids=["plain", "filtered", "penalties"])
def test_first_token_is_distributed_as_the_target(params):
    gen = torch.Generator().manual_seed(0)
    step = 2.0 * torch.randn(2, VOCAB, generator=gen)       # logits at the proposal's row and the bonus row
    top = int(step[0].argmax())
    tokens = _run(params, step, [top])
    first = torch.tensor([t[0] for t in tokens])
    # The target's own processing of row 0 (penalties see the prompt; no outputs yet).
    row = SamplingRow(params, [1, 2, 3], [])
    from pagedray.workers.sampler import apply_penalties
    p = filtered_probs(apply_penalties(step[:1].clone(), [row]), [row])[0]
    counts = torch.bincount(first, minlength=VOCAB).double()
    assert _chi2_pvalue(counts, p.double()) > 1e-3
    accepted = sum(len(t) == 2 for t in tokens) / ROWS
    assert abs(accepted - float(p[top])) < 4 * (float(p[top]) * (1 - float(p[top])) / ROWS) ** 0.5 + 1e-3


def test_second_token_after_an_accepted_proposal_sees_it_as_an_output():
    """After accepting the proposal, the bonus row is drawn from its own p, whose penalties count
    the accepted proposal as an output."""
    params = SamplingParams(temperature=1.0, frequency_penalty=2.0)
    gen = torch.Generator().manual_seed(1)
    step = torch.randn(2, VOCAB, generator=gen)
    step[0, 4] = 8.0                                          # proposal 4 is almost always accepted
    tokens = [t for t in _run(params, step, [4]) if len(t) == 2]
    second = torch.bincount(torch.tensor([t[1] for t in tokens]), minlength=VOCAB).double()
    row = SamplingRow(params, [1, 2, 3], [4])
    from pagedray.workers.sampler import apply_penalties
    p = filtered_probs(apply_penalties(step[1:].clone(), [row]), [row])[0]
    assert _chi2_pvalue(second, p.double()) > 1e-3


def test_greedy_accepts_the_matching_prefix_then_the_argmax():
    logits = torch.full((4, VOCAB), -5.0)
    for r, t in enumerate([3, 7, 2, 9]):
        logits[r, t] = 5.0
    rows = [SamplingRow(SamplingParams(temperature=0), [1], [])]
    assert verify(Sampler(), logits, rows, [("a", 0, [3, 7, 5])])[0] == [[3, 7, 2]]
    assert verify(Sampler(), logits, rows, [("a", 0, [3, 7, 2])])[0] == [[3, 7, 2, 9]]
    assert verify(Sampler(), logits, rows, [("a", 0, [4, 7, 2])])[0] == [[3]]


def test_seeded_rows_are_reproducible_and_seed_dependent():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3 * 64, VOCAB, generator=gen)
    def run(seed):
        rows = [SamplingRow(SamplingParams(temperature=1.0, seed=seed), [1], []) for _ in range(64)]
        groups = [(f"r{i}", 3 * i, [0, 1]) for i in range(64)]
        return verify(Sampler(seed=9), logits, rows, groups)[0]
    assert run(4) == run(4)
    assert run(4) != run(5)
