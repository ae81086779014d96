"""The batched sampler against hand computations and a plain reference of the filtered softmax,
and the engine's logprobs / prompt_logprobs against HF transformers' logits."""
from __future__ import annotations

import math

import pytest
import torch

from pagedray.workers.sampler import (Sampler, SamplingRow, _fmix32, _row_keys, apply_penalties,
                                      seeded_uniform)
from pagedray.common.sampling_params import SamplingParams

PROBS = [0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.03, 0.02]


def _row(prompt=(1, 2), outputs=(), **kwargs) -> SamplingRow:
    return SamplingRow(SamplingParams(**kwargs), list(prompt), list(outputs))


def _logits(batch: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# -- determinism -----------------------------------------------------------------------------------
def test_seeded_rows_ignore_batch_order_and_composition():
    logits = _logits(4)
    rows = [_row(seed=7, outputs=[5] * 3), _row(seed=8), _row(temperature=0.8), _row(seed=7, top_p=0.9)]
    alone = [Sampler(seed=123)(logits[i:i + 1], [rows[i]]).token_ids[0] for i in (0, 1, 3)]
    together = Sampler(seed=0)(logits, rows).token_ids
    reversed_ = Sampler(seed=99)(logits.flip(0), rows[::-1]).token_ids[::-1]
    assert [together[i] for i in (0, 1, 3)] == alone
    assert [reversed_[i] for i in (0, 1, 3)] == alone


def test_seeded_draw_depends_on_output_position():
    logits = torch.zeros(1, 1000)   # uniform: a repeated token would be a 1/1000 coincidence per step
    tokens = [Sampler()(logits, [_row(seed=3, outputs=[0] * pos)]).token_ids[0] for pos in range(20)]
    again = [Sampler()(logits, [_row(seed=3, outputs=[9] * pos)]).token_ids[0] for pos in range(20)]
    assert tokens == again
    assert len(set(tokens)) > 15


def test_different_seeds_differ():
    logits = torch.zeros(2, 1000)
    draws = [Sampler()(logits, [_row(seed=1, outputs=[0] * p), _row(seed=2, outputs=[0] * p)]).token_ids
             for p in range(20)]
    assert sum(a != b for a, b in draws) >= 18


def test_top_k_1_equals_greedy():
    logits = _logits(32, vocab=200, seed=1)
    greedy = Sampler()(logits, [_row(temperature=0.0) for _ in range(32)]).token_ids
    top1 = Sampler()(logits, [_row(temperature=1.5, top_k=1, seed=i if i % 2 else None)
                              for i in range(32)]).token_ids
    assert top1 == greedy == logits.argmax(-1).tolist()


def test_greedy_rows_in_a_random_batch_take_the_argmax():
    logits = _logits(6, seed=2)
    rows = [_row(temperature=0.0) if i % 2 else _row(temperature=1.0, seed=i) for i in range(6)]
    out = Sampler()(logits, rows).token_ids
    assert [out[i] for i in (1, 3, 5)] == [logits[i].argmax().item() for i in (1, 3, 5)]


# -- the counter-based generator -------------------------------------------------------------------
def _fmix32_py(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash_matches_python_integer_arithmetic():
    xs = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF, 123456789]
    assert _fmix32(torch.tensor(xs, dtype=torch.int64)).tolist() == [_fmix32_py(x) for x in xs]
    keys = _row_keys(42, 3)
    u = seeded_uniform(torch.tensor([keys]), 5)[0].tolist()
    for tok in range(5):
        high = _fmix32_py(_fmix32_py(tok ^ keys[0]) ^ keys[1])
        low = _fmix32_py(_fmix32_py(tok ^ keys[2]) ^ keys[3]) >> 11
        assert u[tok] == ((high << 21) + low + 0.5) / 2 ** 53


def test_seeded_uniforms_look_uniform():
    keys = torch.tensor([_row_keys(s, p) for s in range(8) for p in range(8)])
    u = seeded_uniform(keys, 4096).flatten()
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.002          # sd of the mean: 0.29 / 512
    hist = torch.histc(u.float(), bins=16, min=0, max=1) / u.numel()
    assert (hist - 1 / 16).abs().max().item() < 0.002


# -- distributions ---------------------------------------------------------------------------------
def _reference_probs(logits: list[float], temperature: float, top_k: int, top_p: float,
                     min_p: float) -> list[float]:
    """The filtered softmax, written out plainly: temperature, min-p, top-k, top-p (vLLM V1 order)."""
    z = [x / temperature for x in logits]
    m = max(z)
    p = [math.exp(x - m) for x in z]
    total = sum(p)
    p = [x / total for x in p]
    keep = [x >= min_p * max(p) for x in p]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    if top_k > 0:
        for rank, i in enumerate(order):
            keep[i] = keep[i] and rank < top_k
    mass = sum(p[i] for i in order if keep[i])
    before = 0.0
    for i in order:
        if keep[i]:
            if before >= top_p:
                keep[i] = False
            before += p[i] / mass
    q = [x if k else 0.0 for x, k in zip(p, keep)]
    return [x / sum(q) for x in q]


CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=3),
    "top_p": dict(top_p=0.6),
    "min_p": dict(min_p=0.3),
    "all": dict(temperature=1.3, top_k=6, top_p=0.8, min_p=0.1),
}
DRAWS = 20000


@pytest.mark.parametrize("seeded", [False, True], ids=["generator", "seeded"])
@pytest.mark.parametrize("case", list(CASES))
def test_empirical_distribution_matches_filtered_softmax(case, seeded):
    kw = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) | CASES[case]
    logits = [math.log(p) for p in PROBS]
    expected = _reference_probs(logits, **kw)
    rows = [_row(seed=i if seeded else None, **kw) for i in range(DRAWS)]
    tokens = Sampler(seed=5)(torch.tensor([logits] * DRAWS), rows).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=len(PROBS)).tolist()
    for tok, e in enumerate(expected):
        if e == 0.0:
            assert counts[tok] == 0, f"token {tok} is filtered out but was drawn {counts[tok]} times"
    tv = 0.5 * sum(abs(c / DRAWS - e) for c, e in zip(counts, expected))
    # Sampling noise gives E[TV] ~ 0.008 here; a filter off by one token moves >= 0.02 of mass.
    assert tv < 0.015, (counts, expected)


# -- penalties and min_tokens ----------------------------------------------------------------------
def test_penalties_match_hand_computation():
    logits = torch.tensor([[1.0, 2.0, -1.0, 0.5, 3.0], [1.0, 2.0, -1.0, 0.5, 3.0]])
    rows = [_row(prompt=[1, 2], outputs=[2, 3, 3], repetition_penalty=1.5, frequency_penalty=0.5,
                 presence_penalty=0.25),
            _row(prompt=[1, 2], outputs=[2, 3, 3])]
    out = apply_penalties(logits.clone(), rows)
    # token 0 unseen; 1 prompt only (2 / 1.5); 2 prompt + output once (-1 * 1.5 - 0.5 - 0.25);
    # 3 output twice (0.5 / 1.5 - 2 * 0.5 - 0.25); 4 unseen.
    expected = [1.0, 2.0 / 1.5, -1.5 - 0.5 - 0.25, 0.5 / 1.5 - 1.0 - 0.25, 3.0]
    assert out[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert out[1].tolist() == logits[1].tolist()


def test_penalties_steer_the_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    assert Sampler()(logits, [_row(temperature=0, outputs=[0])]).token_ids == [0]
    assert Sampler()(logits, [_row(temperature=0, outputs=[0], frequency_penalty=1.5)]).token_ids == [1]
    assert Sampler()(logits, [_row(temperature=0, prompt=[0], repetition_penalty=1.3)]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0, 7.0]])

    def pick(outputs: int, **kw) -> int:
        params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3], **kw)
        params.eos_token_id = 2
        return Sampler()(logits, [SamplingRow(params, [1], [4] * outputs)]).token_ids[0]

    assert pick(0) == 4 and pick(1) == 4      # eos (2) and stop id (3) banned
    assert pick(2) == 2                         # reached: eos allowed again
    assert pick(0, ignore_eos=True) == 2        # ignore_eos: eos is an ordinary token


# -- logprobs --------------------------------------------------------------------------------------
def test_logprobs_are_raw_with_ranks_and_top_n():
    logits = _logits(2, vocab=10, seed=4)
    rows = [_row(temperature=0.5, seed=1, logprobs=3, repetition_penalty=1.8, prompt=list(range(10))),
            _row(temperature=0, logprobs=None)]
    out = Sampler()(logits, rows)
    raw = torch.log_softmax(logits[0], -1)
    entry = out.logprobs[0]
    tok = out.token_ids[0]
    assert entry[0][0] == tok and entry[0][1] == pytest.approx(raw[tok].item(), abs=1e-6)
    assert entry[0][2] == 1 + int((raw > raw[tok]).sum())
    top = raw.topk(3)
    assert [e[0] for e in entry[1:]] == top.indices.tolist()
    assert [e[1] for e in entry[1:]] == pytest.approx(top.values.tolist(), abs=1e-6)
    assert [e[2] for e in entry[1:]] == [1, 2, 3]
    assert out.logprobs[1] is None


# -- against HF transformers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from testkit.tiny_models import load_hf_model, make_tiny_llama
    path = make_tiny_llama(tmp_path_factory.mktemp("tiny"), tie_word_embeddings=True)
    return path, load_hf_model(path)


def test_greedy_logprobs_equal_hf_log_softmax(tiny):
    from pagedray.cluster import LLM
    path, hf = tiny
    prompt = [5, 17, 33, 101, 7, 250, 64]
    out = LLM(path, device="cpu").generate({"prompt_token_ids": prompt},
                                          SamplingParams(temperature=0, max_tokens=6, logprobs=4),
                                          use_tqdm=False)[0].outputs[0]
    ids = torch.tensor([prompt + out.token_ids[:-1]])
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids).logits[0, len(prompt) - 1:].float(), -1)
    for step, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs)):
        assert tok == ref[step].argmax().item()
        top = ref[step].topk(4)
        assert set(lps) == set(top.indices.tolist()) | {tok}
        for t, lp in lps.items():
            assert lp == pytest.approx(ref[step, t].item(), abs=1e-4)


@pytest.mark.parametrize("chunk", [None, 8], ids=["one_pass", "chunked"])
def test_prompt_logprobs_equal_hf(tiny, chunk):
    from pagedray.cluster import LLM
    path, hf = tiny
    prompt = [(i * 37 + 11) % 317 + 3 for i in range(21)]
    llm = LLM(path, device="cpu", block_size=4, max_num_batched_tokens=chunk)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2)
    # The same prompt twice: the second would hit the prefix cache, which prompt_logprobs bypasses.
    outs = [llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0] for _ in range(2)]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    for out in outs:
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for pos in range(1, len(prompt)):
            expected_ids = set(ref[pos - 1].topk(2).indices.tolist()) | {prompt[pos]}
            assert set(plp[pos]) == expected_ids, pos
            for t, lp in plp[pos].items():
                assert lp == pytest.approx(ref[pos - 1, t].item(), abs=1e-4)
    assert llm.llm_engine.get_stats().num_used_blocks == 0
