"""The comparison rule every check against HF transformers (or TP=1) uses: tests/testkit/hf_compare.py."""
from __future__ import annotations

import pytest
import torch

from testkit.hf_compare import Greedy, argmax_mismatch, assert_greedy_match, greedy_mismatch


def _steps(*tops: tuple[int, float, int, float]) -> list[dict[int, float]]:
    return [{a: la, b: lb} for a, la, b, lb in tops]


REF = Greedy([5, 7, 9], _steps((5, -0.5, 6, -1.9), (7, -1.4822129, 8, -1.4822086), (9, -0.1, 3, -3.0)))


def test_identical_passes():
    assert greedy_mismatch(REF, REF) is None


def test_near_tie_passes_and_nothing_after_it_is_compared():
    # The Mixtral case of issue 10: 240 vs 133 at -1.4822086 vs -1.4822129; what follows differs.
    ours = Greedy([5, 8, 1, 1], _steps((5, -0.50004, 6, -1.9), (8, -1.4822080, 7, -1.4822130),
                                       (1, -0.2, 2, -2.0), (1, -0.3, 2, -2.0)))
    assert greedy_mismatch(ours, REF) is None


def test_clear_wrong_token_fails():
    ours = Greedy([5, 8, 9], _steps((5, -0.5, 6, -1.9), (8, -1.0, 7, -1.6), (9, -0.1, 3, -3.0)))
    assert "step 1: token 8 vs reference 7, not a near-tie" in greedy_mismatch(ours, REF)


def test_token_outside_the_other_top2_fails_even_when_close():
    ours = Greedy([5, 4, 9], _steps((5, -0.5, 6, -1.9), (4, -1.48221, 7, -1.48222), (9, -0.1, 3, -3.0)))
    assert "not a near-tie" in greedy_mismatch(ours, REF)   # 4 is not in the reference's top-2


def test_gap_just_over_the_bound_fails():
    ref = Greedy([7], _steps((7, -1.0, 8, -1.0011)))
    ours = Greedy([8], _steps((8, -1.0, 7, -1.0011)))
    assert greedy_mismatch(ours, ref) is not None
    assert greedy_mismatch(ours, ref, tie=2e-3) is None


def test_length_mismatch_fails():
    shorter = Greedy(REF.tokens[:2], REF.steps[:2])
    longer = Greedy(REF.tokens + [9], REF.steps + [{9: -0.1, 3: -3.0}])
    assert "2 tokens vs reference 3" in greedy_mismatch(shorter, REF)
    assert "4 tokens vs reference 3" in greedy_mismatch(longer, REF)


def test_equal_tokens_with_far_logprobs_fail():
    ours = Greedy(REF.tokens, [{5: -0.5002, 6: -1.9}] + REF.steps[1:])   # 2e-4 off, atol 1e-4
    assert "step 0: token 5 logprob" in greedy_mismatch(ours, REF)
    with pytest.raises(AssertionError, match="prompt x: step 0"):
        assert_greedy_match(ours, REF, what="prompt x")


def test_argmax_rows_near_tie_passes_clear_gap_fails():
    ref = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0000005, 0.0]])
    tied = torch.tensor([[3.0, 1.0, 0.0], [2.0000005, 2.0, 0.0]])
    assert argmax_mismatch(tied, ref) is None
    wrong = torch.tensor([[1.0, 3.0, 0.0], [2.0, 2.0000005, 0.0]])
    assert "row 0: argmax 1 vs reference 0" in argmax_mismatch(wrong, ref)
