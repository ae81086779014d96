"""The sampler's one-pass path (the fused_sampling kernel option): which batches take it, and what it draws.

On the CPU the path runs with the kernel's PyTorch reference (reference.race_sample) in place of the
CUDA kernel; on a GPU the last tests run the kernel itself.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from testkit.kernel_cases import set_kernel_options

from pagedray.kernels import cuda_available, reference
from pagedray.kernels import options as kernel_options
from pagedray.workers import sampler as sampler_mod
from pagedray.workers.sampler import Sampler, SamplingRow, fused_sampler
from pagedray.common.sampling_params import SamplingParams

PROBS = [0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.03, 0.02]
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_available()),
                                reason="needs a CUDA device and CuPy")


def _row(outputs=(), **kwargs) -> SamplingRow:
    return SamplingRow(SamplingParams(**kwargs), [1, 2], list(outputs))


def _logits(batch: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


temperatures_seen: list[list[float]] = []


@pytest.fixture
def race_calls(monkeypatch) -> list[int]:
    """Route the fused path to the reference on any device; records the batch size of each call."""
    calls: list[int] = []

    def race(logits, temperatures, keys):
        calls.append(logits.shape[0])
        temperatures_seen.append(temperatures.tolist())
        return reference.race_sample(logits, temperatures, keys)
    monkeypatch.setattr(sampler_mod, "fused_sampler", lambda logits: race)
    return calls


# -- the gate ---------------------------------------------------------------------------------------
TAKES = {
    "temperature": [_row(temperature=0.8), _row(temperature=1.0)],
    "mixed greedy": [_row(temperature=0.0), _row(temperature=1.3)],
    "seeded": [_row(temperature=1.0, seed=3), _row(temperature=0.5)],
    "min_tokens reached": [_row(temperature=1.0, min_tokens=2, eos_token_id=5, outputs=[7, 8])],
    "greedy with top_k": [_row(temperature=0.0, top_k=5), _row(temperature=1.0)],
    "all greedy": [_row(temperature=0.0), _row(temperature=0.0)],          # the race's greedy scan
}
SKIPS = {
    "top_k": [_row(temperature=1.0), _row(temperature=1.0, top_k=5)],
    "top_p": [_row(temperature=1.0), _row(temperature=1.0, top_p=0.9)],
    "min_p": [_row(temperature=1.0), _row(temperature=1.0, min_p=0.1)],
    "logprobs": [_row(temperature=1.0), _row(temperature=1.0, logprobs=2)],
    "greedy logprobs": [_row(temperature=1.0), _row(temperature=0.0, logprobs=0)],
    "penalty": [_row(temperature=1.0), _row(temperature=1.0, presence_penalty=0.5)],
    "min_tokens active": [_row(temperature=1.0), _row(temperature=1.0, min_tokens=3, eos_token_id=5)],
}


@pytest.mark.parametrize("case", list(TAKES))
def test_batches_that_take_the_fused_path(case, race_calls):
    Sampler()(_logits(len(TAKES[case])), TAKES[case])
    assert race_calls == [len(TAKES[case])]


@pytest.mark.parametrize("case", list(SKIPS))
def test_batches_that_do_not(case, race_calls):
    Sampler()(_logits(len(SKIPS[case])), SKIPS[case])
    assert race_calls == []


def test_on_by_default_but_never_on_cpu(monkeypatch):
    logits = _logits(2)
    assert kernel_options.current().fused_sampling is True
    assert fused_sampler(logits) is None          # CPU logits: the existing passes
    set_kernel_options(monkeypatch, fused_sampling=False)
    assert fused_sampler(logits) is None


def test_temperatures_follow_the_batch(race_calls):
    sampler = Sampler()
    a = [_row(temperature=0.5), _row(temperature=1.0)]
    b = [_row(temperature=1.0), _row(temperature=0.0), _row(temperature=2.0, seed=1)]
    temperatures_seen.clear()
    for rows in (a, a, b, a):
        sampler(_logits(len(rows)), rows)
    # Greedy and seeded rows race as greedy (temperature 0); the seeded row is then sampled apart.
    assert temperatures_seen == [[0.5, 1.0], [0.5, 1.0], [1.0, 0.0, 0.0], [0.5, 1.0]]


# -- what the fused path draws ----------------------------------------------------------------------
def test_an_all_greedy_batch_races_at_temperature_zero_and_equals_argmax(race_calls):
    logits = _logits(5)
    temperatures_seen.clear()
    out = Sampler()(logits, [_row(temperature=0.0) for _ in range(5)])
    assert temperatures_seen == [[0.0] * 5]
    assert out.token_ids == logits.argmax(-1).tolist()


def test_greedy_and_seeded_rows_keep_their_tokens(race_calls, monkeypatch):
    logits = _logits(8, vocab=500, seed=1)
    rows = [_row(temperature=0.0), _row(temperature=0.9, seed=11), _row(temperature=1.0),
            _row(temperature=0.0, seed=4), _row(temperature=1.4, seed=12, outputs=[3, 3]),
            _row(temperature=0.7), _row(temperature=0.0), _row(temperature=1.0, seed=13)]
    fused = Sampler(seed=1)(logits, rows).token_ids
    assert race_calls == [8]
    monkeypatch.undo()                                 # the existing passes, one row at a time
    seeded = [1, 4, 7]
    alone = [Sampler(seed=99)(logits[i:i + 1], [rows[i]]).token_ids[0] for i in seeded]
    assert [fused[i] for i in seeded] == alone
    assert [fused[i] for i in (0, 3, 6)] == logits[[0, 3, 6]].argmax(-1).tolist()


def test_all_seeded_batch_takes_the_seeded_tokens(race_calls):
    logits = _logits(3, vocab=200, seed=2)
    rows = [_row(temperature=1.0, seed=s) for s in (1, 2, 3)]
    alone = [Sampler()._general(logits[i:i + 1], [rows[i]])[0].item() for i in range(3)]
    assert Sampler()(logits, rows).token_ids == alone


def test_unseeded_draws_follow_the_generator(race_calls):
    logits = _logits(16, vocab=1000, seed=3)
    rows = [_row(temperature=1.0) for _ in range(16)]
    s1, s2 = Sampler(seed=5), Sampler(seed=5)
    a, b = s1(logits, rows).token_ids, s2(logits, rows).token_ids
    assert a == b
    steps = [s1(logits, rows).token_ids for _ in range(5)]
    assert sum(step != a for step in steps) >= 4    # fresh keys every step


def test_fused_distribution_matches_softmax(race_calls):
    draws, temperature = 20000, 0.7
    logits = torch.tensor([[math.log(p) for p in PROBS]] * draws)
    tokens = torch.tensor(Sampler(seed=5)(logits, [_row(temperature=temperature)] * draws).token_ids)
    want = torch.softmax(torch.tensor([math.log(p) for p in PROBS]) / temperature, 0).tolist()
    counts = torch.bincount(tokens, minlength=len(PROBS)).tolist()
    tv = 0.5 * sum(abs(c / draws - e) for c, e in zip(counts, want))
    # Sampling noise gives E[TV] ~ 0.008; a missing temperature moves ~0.08 of mass.
    assert tv < 0.015, (counts, want)


# -- on the GPU: the kernel itself ------------------------------------------------------------------
@needs_cuda
def test_cuda_switch_off_takes_the_old_passes(monkeypatch):
    logits = _logits(4, vocab=1000).cuda()
    rows = [_row(temperature=1.0) for _ in range(4)]
    set_kernel_options(monkeypatch, fused_sampling=False)
    assert fused_sampler(logits) is None
    calls = []
    monkeypatch.setattr(Sampler, "_race", lambda *a: calls.append(a))
    tokens = Sampler(seed=3)(logits, rows).token_ids
    assert calls == [] and all(0 <= t < 1000 for t in tokens)


@needs_cuda
def test_cuda_fused_batch_without_host_sync(monkeypatch):
    assert kernel_options.current().fused_sampling is True
    logits = _logits(64, vocab=32000, seed=4).to(torch.bfloat16).cuda()
    rows = [_row(temperature=0.0) if i % 4 == 0 else _row(temperature=1.0, seed=i if i % 4 == 1 else None)
            for i in range(64)]
    sampler = Sampler(seed=2)
    assert fused_sampler(logits) is not None
    sampler.sample(logits, rows)                      # compile and warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            device_sample = sampler.sample(logits, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not [w for w in caught if "synchroniz" in str(w.message)], [str(w.message) for w in caught]
    tokens = device_sample.to_host().token_ids
    set_kernel_options(monkeypatch, fused_sampling=False)
    plain = Sampler(seed=2)(logits, rows).token_ids
    greedy = [i for i in range(64) if i % 4 == 0]
    seeded = [i for i in range(64) if i % 4 == 1]
    assert [tokens[i] for i in greedy + seeded] == [plain[i] for i in greedy + seeded]
