"""Grammar masks of a verification: row j of a request is masked as if its first j proposals were
outputs (a fresh matcher fed outputs + proposals[:j] is the reference), the rows after a proposal
the grammar refuses (or after it ended) stay unmasked, and the matcher is left where its outputs
put it."""
from __future__ import annotations

import pytest
import torch
from testkit.tiny_models import make_tiny_llama
from transformers import AutoTokenizer

from pagedray.common.sampling_params import SamplingParams, StructuredOutputsParams
from pagedray.workers.sampler import Sampler, SamplingRow
from pagedray.workers.spec_decode.rejection import expand_rows, verify
from pagedray.workers.structured_output import GrammarBackend, LogitsConstraints

REGEX = r"(ab )+cd"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("grammar"), num_hidden_layers=1)
    tok = AutoTokenizer.from_pretrained(path)
    backend = GrammarBackend(path, len(tok))
    yield tok, backend
    backend.shutdown()


def _row(tok, outputs: list[int], **kw) -> SamplingRow:
    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex=REGEX), eos_token_id=tok.eos_token_id,
                            **kw)
    return SamplingRow(params, [1, 2], list(outputs))


def _reference_mask(tok, backend, tokens: list[int]) -> torch.Tensor:
    """Allowed tokens after `tokens`, from a fresh matcher."""
    import xgrammar as xgr
    matcher = xgr.GrammarMatcher(backend.compiled(StructuredOutputsParams(regex=REGEX)),
                                 override_stop_tokens=[tok.eos_token_id])
    for t in tokens:
        assert matcher.accept_token(t)
    logits = torch.zeros(1, len(tok))
    bitmask = torch.full((1, (len(tok) + 31) // 32), -1, dtype=torch.int32)
    matcher.fill_next_token_bitmask(bitmask, 0)
    from pagedray.workers.structured_output import apply_token_bitmask
    apply_token_bitmask(logits, bitmask, [0])
    return logits[0] == 0


def test_each_verified_position_gets_the_mask_after_the_proposals_before_it(setup):
    tok, backend = setup
    text = tok.encode("ab ab ab cd", add_special_tokens=False)
    assert len(text) >= 4
    outputs, drafts = text[:1], text[1:]
    bad = tok.encode("z", add_special_tokens=False)[0]
    constraints = LogitsConstraints(backend)
    # Request 0: every proposal valid, then the eos (which ends the grammar) and one more row.
    # Request 1: its second proposal is refused by the grammar.
    rows = [_row(tok, outputs), _row(tok, outputs)]
    groups = [("a", 0, drafts + [tok.eos_token_id]), ("b", len(drafts) + 2, [drafts[0], bad, drafts[1]])]
    erows = expand_rows(rows, groups)
    logits = constraints.speculative(torch.zeros(len(erows), len(tok)), erows, groups)
    allowed = logits == 0
    for j in range(len(drafts) + 1):
        assert torch.equal(allowed[j], _reference_mask(tok, backend, outputs + drafts[:j])), j
    assert allowed[len(drafts)].sum() == 1 and allowed[len(drafts), tok.eos_token_id]
    assert allowed[len(drafts) + 1].all()          # after the grammar ended: no mask
    b0 = len(drafts) + 2
    assert torch.equal(allowed[b0], _reference_mask(tok, backend, outputs))
    assert torch.equal(allowed[b0 + 1], _reference_mask(tok, backend, outputs + drafts[:1]))
    assert not allowed[b0 + 1, bad]
    assert allowed[b0 + 2].all() and allowed[b0 + 3].all()   # past the refused proposal: never read
    # The proposals were rolled back: a plain step masks as after the outputs alone.
    for row in rows:
        assert row.grammar.accepted == len(outputs) and not row.grammar.matcher.is_terminated()
        plain = constraints(torch.zeros(1, len(tok)), [row])
        assert torch.equal(plain[0] == 0, _reference_mask(tok, backend, outputs))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_verify_keeps_only_tokens_the_grammar_allows(setup, temperature):
    """Random logits and proposals: every emitted token continues a valid prefix, whatever is accepted."""
    tok, backend = setup
    text = tok.encode("ab ab ab ab cd", add_special_tokens=False)
    sampler = Sampler(seed=3)
    sampler.constraints = LogitsConstraints(backend)
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        outputs = text[:trial % 3]
        drafts = [text[len(outputs)], text[len(outputs) + 1], int(torch.randint(len(tok), (1,), generator=gen))]
        rows = [_row(tok, outputs, temperature=temperature, seed=trial)]
        logits = torch.randn(len(drafts) + 1, len(tok), generator=gen) * 3
        emitted = verify(sampler, logits, rows, [("a", 0, drafts)])[0][0]
        import xgrammar as xgr
        matcher = xgr.GrammarMatcher(backend.compiled(StructuredOutputsParams(regex=REGEX)),
                                     override_stop_tokens=[tok.eos_token_id])
        for t in outputs + emitted:
            assert matcher.accept_token(t), (trial, outputs, emitted)
