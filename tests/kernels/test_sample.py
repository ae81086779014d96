"""The one-pass sampling kernel (sample.cu) against its PyTorch reference, and the reference's
distribution on the CPU.

Greedy rows must match exactly. A random row's token must carry a key within float tolerance of the
reference's largest key (the kernel's logs differ from PyTorch's by ulps, so a near-tie may go
either way), and the tokens must be equal on nearly every row.
"""
from __future__ import annotations

import math

import pytest
import torch

from pagedray.kernels import cuda_available, reference

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_available()),
                                reason="needs a CUDA device and CuPy")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
NEG_INF = float("-inf")
PROBS = [0.3, 0.2, 0.15, 0.12, 0.1, 0.08, 0.03, 0.02]
CHI2_7DF_P1E4 = 29.88   # chi-square quantile: P(X > 29.88) = 1e-4 with 7 degrees of freedom
M32 = 0xFFFFFFFF


def _inputs(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    temps = torch.rand(rows, generator=g) + 0.5
    temps[::3] = 0.0                                   # every third row greedy
    keys = torch.randint(0, 1 << 32, (rows, 2), generator=g)
    return logits.to(device), temps.to(device), keys.to(device)


def _kernel(*args, **kwargs):
    from pagedray.kernels.sample_cuda import race_sample
    return race_sample(*args, **kwargs)


def check_against_reference(logits, temps, keys, got):
    """Greedy rows exact; random rows: the chosen key is a maximum within float tolerance."""
    want = reference.race_sample(logits, temps, keys)
    z = reference.race_keys(logits, temps, keys)
    assert ((got >= 0) & (got < logits.shape[1])).all(), "a token id outside the vocabulary"
    greedy = temps <= 0
    assert torch.equal(got[greedy], want[greedy])
    zmax = z.max(dim=-1).values
    chosen = z.gather(1, got[:, None]).squeeze(1)
    tol = 3e-5 + 2e-6 * zmax.abs()
    finite = torch.isfinite(zmax)
    assert (chosen[finite] >= zmax[finite] - tol[finite]).all(), "a random row's token is not a maximum"
    assert torch.equal(got[~finite], want[~finite])
    assert (got == want).float().mean().item() >= 0.99


# -- kernel == reference (CUDA) --------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("vocab", [1, 13, 32000, 128256])
@pytest.mark.parametrize("rows", [1, 7, 256])
def test_kernel_matches_reference(rows, vocab, dtype):
    logits, temps, keys = _inputs(rows, vocab, dtype, "cuda", seed=rows * vocab)
    out = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    got = _kernel(logits, temps, keys, out=out)
    assert got.data_ptr() == out.data_ptr()
    check_against_reference(logits, temps, keys, got)


@needs_cuda
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_masked_vocab_and_special_values(dtype):
    rows, vocab = 12, 32000
    logits, temps, keys = _inputs(rows, vocab, dtype, "cuda", seed=3)
    temps[:6] = 0.0
    temps[6:] = 1.0
    for r in (0, 6):
        logits[r, 5000:] = NEG_INF                   # a masked slice: the winner is among 0..4999
    for r in (1, 7):
        logits[r] = NEG_INF                          # the whole row -inf: token 0, as torch.argmax
    for r in (2, 8):
        logits[r] = NEG_INF
        logits[r, 31999] = -1e4 if dtype == FP32 else -100.0  # one finite logit, the last
    logits[3, 777] = float("nan")                    # greedy: the first NaN wins, as torch.argmax
    logits[3, 20000] = float("nan")
    logits[4] = 0.0
    logits[4, :100] = -0.0                           # -0 == +0: the first zero wins
    logits[5] = -5.0
    logits[5, [9000, 17, 31000]] = 50.0              # a tie across CTAs: the lowest index
    logits[9, 12345] = 1e4 if dtype == FP32 else 1e3  # overwhelming: sampled with probability ~1
    got = _kernel(logits, temps, keys)
    assert got[[0, 1, 2, 3, 4, 5]].tolist() == [logits[0].float().argmax().item(), 0, 31999, 777, 0, 17]
    assert got[6].item() < 5000
    assert got[[7, 8, 9]].tolist() == [0, 31999, 12345]
    check_against_reference(logits, temps, keys, got)


@needs_cuda
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_strided_and_unaligned_rows(dtype):
    rows, vocab = 7, 32003          # not a multiple of the vector width: a tail of 3 elements
    wide, temps, keys = _inputs(rows, vocab + 13, dtype, "cuda", seed=4)
    wide[0, vocab - 1] = 100.0      # a greedy row (row 0) whose maximum is the last element
    # Row stride V + 13 (a 16-byte multiple); the second view starts one element in: unaligned rows.
    for view in (wide[:, :vocab], wide[:, 1:vocab + 1]):
        check_against_reference(view, temps, keys, _kernel(view, temps, keys))
    padded = torch.zeros(rows, vocab + 29, dtype=dtype, device="cuda")[:, :vocab]   # 16-byte aligned rows
    padded.copy_(wide[:, :vocab])
    got = _kernel(padded, temps, keys)
    assert got[0].item() == vocab - 1
    check_against_reference(padded, temps, keys, got)
    assert torch.equal(got, _kernel(padded.contiguous(), temps, keys))


@needs_cuda
def test_int32_keys_are_the_low_words_of_int64_keys():
    logits, temps, keys = _inputs(64, 32000, BF16, "cuda", seed=5)
    as_int32 = torch.where(keys >= 1 << 31, keys - (1 << 32), keys).to(torch.int32)   # the same bits
    assert torch.equal(_kernel(logits, temps, as_int32), _kernel(logits, temps, keys))
    assert torch.equal(_kernel(logits, temps, keys + (7 << 32)), _kernel(logits, temps, keys))


@needs_cuda
def test_kernel_extreme_uniforms():
    logits, temps, keys = _extreme_case("cuda")
    got = _kernel(logits, temps, keys)
    assert got.tolist() == reference.race_sample(logits, temps, keys).tolist() == [3, 5]


@needs_cuda
def test_kernel_distribution_matches_softmax():
    logits, temps, keys = _distribution_inputs("cuda")
    _assert_softmax_distribution(_kernel(logits, temps, keys).cpu(), temperature=0.7)


@needs_cuda
def test_repeated_launches_reuse_the_ticket_counters():
    """Split rows count finished CTAs in a scratch counter that each launch leaves at zero."""
    logits, temps, keys = _inputs(3, 128256, BF16, "cuda", seed=6)
    first = _kernel(logits, temps, keys)
    for _ in range(5):
        assert torch.equal(_kernel(logits, temps, keys), first)
    big = _inputs(300, 128256, BF16, "cuda", seed=7)   # grows the scratch
    check_against_reference(*big, _kernel(*big))
    assert torch.equal(_kernel(logits, temps, keys), first)


# -- the reference on the CPU ----------------------------------------------------------------------
def _fmix32_inverse(x: int) -> int:
    x ^= x >> 16
    x = (x * pow(0xC2B2AE35, -1, 1 << 32)) & M32
    x ^= (x >> 13) ^ (x >> 26)
    x = (x * pow(0x85EBCA6B, -1, 1 << 32)) & M32
    return x ^ (x >> 16)


def _fmix32(x: int) -> int:
    return int(reference.fmix32(torch.tensor([x]))[0])


def _keys_with_hash(token: int, target: int, k0: int) -> list[int]:
    """Keys (k0, k1) for which token's hash is `target`."""
    return [k0, _fmix32(token ^ k0) ^ _fmix32_inverse(target)]


def _extreme_case(device: str):
    """Row 0: a uniform row where token 3 has h = 0 (W = 2^-33, the largest boost): it wins.
    Row 1: only token 5 finite, with h = 2^32 - 1 (W clamped below 1, the smallest boost): it wins."""
    logits = torch.zeros(2, 16)
    logits[1] = NEG_INF
    logits[1, 5] = 0.0
    keys = torch.tensor([_keys_with_hash(3, 0, 12345), _keys_with_hash(5, M32, 999)])
    return logits.to(device), torch.ones(2, device=device), keys.to(device)


def test_fmix32_inverse_and_key_construction():
    for x in (0, 1, 0xDEADBEEF, M32):
        assert _fmix32_inverse(_fmix32(x)) == x
    k0, k1 = _keys_with_hash(3, 0, 12345)
    assert _fmix32(_fmix32(3 ^ k0) ^ k1) == 0


def test_reference_extreme_uniforms_give_finite_keys():
    logits, temps, keys = _extreme_case("cpu")
    z = reference.race_keys(logits, temps, keys)
    assert torch.isfinite(z[0]).all() and torch.isfinite(z[1, 5])
    assert z[1].isneginf().sum().item() == 15
    assert reference.race_sample(logits, temps, keys).tolist() == [3, 5]


def test_reference_hash_is_the_seeded_samplers_high_word():
    from pagedray.workers.sampler import seeded_uniform
    keys = torch.tensor([[11, 22, 33, 44], [M32, 0, 5, 6]])
    high = (seeded_uniform(keys, 50) * 2.0 ** 53).long() >> 21
    tokens = torch.arange(50)[None, :]
    assert torch.equal(reference.fmix32(reference.fmix32(tokens ^ keys[:, :1]) ^ keys[:, 1:2]), high)


def test_reference_greedy_rows_are_the_argmax():
    logits, temps, keys = _inputs(9, 100, FP32, "cpu", seed=8)
    got = reference.race_sample(logits, temps, keys)
    greedy = temps <= 0
    assert torch.equal(got[greedy], logits[greedy].argmax(-1))


def _distribution_inputs(device: str, draws: int = 40000):
    logits = torch.tensor([[math.log(p) for p in PROBS]] * draws)
    keys = torch.randint(0, 1 << 32, (draws, 2), generator=torch.Generator().manual_seed(11))
    return logits.to(device), torch.full((draws,), 0.7, device=device), keys.to(device)


def chi_square(tokens: torch.Tensor, expected: list[float]) -> float:
    counts = torch.bincount(tokens, minlength=len(expected)).double()
    want = torch.tensor(expected, dtype=torch.float64) * tokens.numel()
    return (((counts - want) ** 2) / want).sum().item()


def _assert_softmax_distribution(tokens: torch.Tensor, temperature: float) -> None:
    want = torch.softmax(torch.tensor([math.log(p) for p in PROBS], dtype=torch.float64) / temperature, 0)
    assert chi_square(tokens, want.tolist()) < CHI2_7DF_P1E4
    # The test can fail: the same draws are far from softmax(l) (temperature ignored).
    assert chi_square(tokens, PROBS) > 10 * CHI2_7DF_P1E4


def test_reference_distribution_matches_softmax():
    logits, temps, keys = _distribution_inputs("cpu")
    _assert_softmax_distribution(reference.race_sample(logits, temps, keys), temperature=0.7)


# -- launcher checks -------------------------------------------------------------------------------
def test_launcher_rejects_cpu_tensors():
    logits, temps, keys = _inputs(2, 16, FP32, "cpu")
    with pytest.raises(ValueError, match="logits must be on a CUDA device"):
        _kernel(logits, temps, keys)


@needs_cuda
@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(logits=a["logits"].double()), "logits must have dtype"),
    (lambda a: a.update(logits=a["logits"][0]), "logits must have 2 dimensions"),
    (lambda a: a.update(logits=a["logits"][:, :0]), "logits must have a vocabulary"),
    (lambda a: a.update(logits=a["logits"].t().contiguous().t()), "logits must be dense in its last"),
    (lambda a: a.update(temperatures=a["temperatures"].double()), "temperatures must have dtype"),
    (lambda a: a.update(temperatures=a["temperatures"][:2]), "temperatures must be a contiguous \\[3\\]"),
    (lambda a: a.update(temperatures=a["temperatures"].cpu()), "temperatures must be on a CUDA device"),
    (lambda a: a.update(keys=a["keys"].float()), "keys must have dtype"),
    (lambda a: a.update(keys=torch.zeros(3, 4, dtype=torch.int64, device="cuda")), "keys must be a contiguous \\[3, 2\\]"),
    (lambda a: a.update(keys=a["keys"].t().contiguous().t()), "keys must be a contiguous"),
    (lambda a: a.update(out=torch.empty(3, dtype=torch.int32, device="cuda")), "out must have dtype"),
    (lambda a: a.update(out=torch.empty(4, dtype=torch.int64, device="cuda")), "out must be a contiguous \\[3\\]"),
])
def test_launcher_rejects(change, match):
    logits, temps, keys = _inputs(3, 64, FP32, "cuda")
    args = dict(logits=logits, temperatures=temps, keys=keys)
    change(args)
    with pytest.raises(ValueError, match=match):
        _kernel(**args)
