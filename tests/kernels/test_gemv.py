"""The skinny GEMM (kernels/gemv.cu) against F.linear in float32, its launcher's checks, and
`ops.linear`'s dispatch (F.linear itself on CPU; the layers call it).

Tolerance: x and W are the same 16-bit values in kernel and reference, so the kernel differs
only by the order of its float32 sums (absolute, a few 1e-6 for outputs of unit size even at
K = 14336) and by rounding its result to the output dtype once (relative: half an ulp, 2^-8
for bfloat16, 2^-11 for float16). Weights are scaled by K^-1/2 so outputs are of unit size;
a lost or doubled 16-byte chunk moves an output by ~0.1, far outside the tolerance.
Outputs start as NaN, so an unwritten element fails.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from testkit.kernel_cases import set_kernel_options

from pagedray.kernels import cuda_available, gemv_cuda, ops, reference

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_available()),
                                reason="needs a CUDA device and CuPy")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
NAN = float("nan")
RTOL = {BF16: 2 ** -8, FP16: 2 ** -11, FP32: 1e-5}
ATOL = 1e-4  # the float32 summation order


def _nan_empty(*shape, dtype=None, device=None, **kw):
    return torch.empty(*shape, dtype=dtype, device=device, **kw).fill_(NAN)


@pytest.fixture(autouse=True)
def _poison_and_seed(monkeypatch):
    monkeypatch.setattr(gemv_cuda, "_empty", _nan_empty)
    torch.manual_seed(1234)


def _inputs(m, k, n, dtype, bias, device="cuda"):
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    return x, w, b


def _check(got, x, w, b):
    want = reference.linear(x, w, b)
    assert got.dtype == x.dtype and got.shape == want.shape
    assert not got.isnan().any(), "NaN in the output: an element was not written"
    torch.testing.assert_close(got.float(), want, rtol=RTOL[x.dtype], atol=ATOL)


SHAPES = [(64, 1), (136, 33), (4096, 6144), (14336, 4096)]


MMA = gemv_cuda._mma(8, 4)  # a tensor-core variant; None: the default (CUDA cores)


@needs_cuda
@pytest.mark.parametrize("variant", [None, MMA], ids=["default", "mma"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [BF16, FP16])
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("m", range(1, 9))
def test_matches_reference(m, k, n, dtype, bias, variant):
    x, w, b = _inputs(m, k, n, dtype, bias)
    _check(gemv_cuda.skinny_gemm(x, w, b, variant=variant), x, w, b)


@needs_cuda
@pytest.mark.parametrize("variant", [None, MMA], ids=["default", "mma"])
@pytest.mark.parametrize("bias", [False, True])
def test_lm_head_shape(bias, variant):
    x, w, b = _inputs(1, 4096, 128256, BF16, bias)
    _check(gemv_cuda.skinny_gemm(x, w, b, variant=variant), x, w, b)


@needs_cuda
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("k,n", [(136, 33), (4096, 6144)])
def test_float32(m, k, n):
    x, w, b = _inputs(m, k, n, FP32, True)
    _check(gemv_cuda.skinny_gemm(x, w, b), x, w, b)


@needs_cuda
@pytest.mark.parametrize("variant", [None, MMA], ids=["default", "mma"])
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_out_given_and_row_strided_x(dtype, variant):
    k, n, m = 4096, 1000, 5
    # Rows 4096 + 24 elements apart, starting 16 bytes into the buffer (a slice of a wider tensor).
    wide = torch.randn(m, k + 24, device="cuda").to(dtype)
    x = wide[:, 8:8 + k]
    _, w, b = _inputs(m, k, n, dtype, True)
    out = torch.full((m, n), NAN, dtype=dtype, device="cuda")
    got = gemv_cuda.skinny_gemm(x, w, b, out=out, variant=variant)
    assert got.data_ptr() == out.data_ptr()
    _check(got, x, w, b)


# K = 2344 is 293 chunks of 8: a full step or more plus a partial one for UNROLL 2, 4 and 8;
# N = 1027 leaves a partial warp and a partial CTA for every ROWS and WARPS of the sweep, and a
# partial 16-row tile for the tensor-core variants.
@needs_cuda
@pytest.mark.parametrize("m,dtype", [(1, BF16), (3, BF16), (8, BF16), (8, FP16)])
@pytest.mark.parametrize("variant", gemv_cuda.SWEEP, ids=gemv_cuda.name_of)
def test_every_sweep_variant(variant, m, dtype):
    x, w, b = _inputs(m, 2344, 1027, dtype, True)
    _check(gemv_cuda.skinny_gemm(x, w, b, variant=variant), x, w, b)


@needs_cuda
def test_ops_linear_dispatch_and_cuda_graph(monkeypatch):
    set_kernel_options(monkeypatch, skinny_gemm=True)
    calls = []
    real = gemv_cuda.skinny_gemm
    monkeypatch.setattr(gemv_cuda, "skinny_gemm", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    _, w, b = _inputs(1, 512, 700, BF16, True)
    x = torch.randn(1, 2, 512, device="cuda").to(BF16)  # 2 tokens: the kernel
    _check(ops.linear(x, w, b).view(2, 700), x.view(2, 512), w, b)
    assert calls == [(2, 512)]
    three = torch.randn(3, 512, device="cuda").to(BF16)  # past skinny_gemm_max_m: F.linear
    torch.testing.assert_close(ops.linear(three, w, b), F.linear(three, w, b))
    assert len(calls) == 1
    set_kernel_options(monkeypatch, skinny_gemm_max_m=8)
    x = torch.randn(2, 3, 512, device="cuda").to(BF16)  # 6 tokens: the kernel
    _check(ops.linear(x, w, b).view(6, 700), x.view(6, 512), w, b)
    assert calls[-1] == (6, 512)
    big = torch.randn(3, 3, 512, device="cuda").to(BF16)  # 9 tokens: F.linear
    torch.testing.assert_close(ops.linear(big, w, b), F.linear(big, w, b))
    assert len(calls) == 2
    static = torch.randn(4, 512, device="cuda").to(BF16)
    ops.linear(static, w, b)  # compiles before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.linear(static, w, b)
    static.copy_(torch.randn(4, 512, device="cuda").to(BF16))
    graph.replay()
    torch.cuda.synchronize()
    _check(y, static, w, b)


@needs_cuda
def test_zero_tokens_give_an_empty_result():
    x, w, b = _inputs(0, 64, 5, BF16, True)
    assert gemv_cuda.skinny_gemm(x, w, b).shape == (0, 5)


# ---------------------------------------------------------------- launcher checks (no GPU needed)

def _cpu_args(m=2, k=16, n=4, dtype=BF16):
    x, w, b = _inputs(m, k, n, dtype, True, device="cpu")
    return dict(x=x, weight=w, bias=b)


@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(x=a["x"].double()), "x must have dtype"),
    (lambda a: a.update(x=a["x"][0]), "x must have 2 dimensions"),
    (lambda a: a.update(x=a["x"].t().contiguous().t()), "x must be dense past its first dimension"),
    (lambda a: a.update(x=torch.zeros(9, 16, dtype=BF16)), "x must have at most 8 rows"),
    (lambda a: a.update(weight=a["weight"].half()), "weight must have dtype"),
    (lambda a: a.update(weight=torch.zeros(16, 4, dtype=BF16).t()), "weight must be contiguous"),
    (lambda a: a.update(weight=torch.zeros(4, 24, dtype=BF16)), "weight shape .* needs 16 columns"),
    (lambda a: a.update(x=torch.zeros(2, 12, dtype=BF16), weight=torch.zeros(4, 12, dtype=BF16)),
     r"K \(x.shape\[1\]\) must be a multiple of 8"),
    (lambda a: a.update(x=torch.zeros(40, dtype=BF16)[1:33].view(2, 16)), "x must be 16-byte aligned"),
    (lambda a: a.update(x=torch.zeros(2, 20, dtype=BF16)[:, :16]), "x must be 16-byte aligned"),
    (lambda a: a.update(weight=torch.zeros(72, dtype=BF16)[4:68].view(4, 16)), "weight must be 16-byte aligned"),
    (lambda a: a.update(bias=a["bias"][:3]), r"bias must be a contiguous \[4\]"),
    (lambda a: a.update(bias=a["bias"].float()), "bias must have dtype"),
    (lambda a: a.update(out=torch.zeros(2, 5, dtype=BF16)), r"out must have shape \(2, 4\)"),
    (lambda a: a.update(out=torch.zeros(2, 4)), "out must have dtype"),
    (lambda a: None, "x must be on a CUDA device"),
])
def test_launcher_rejects(change, match):
    args = _cpu_args()
    change(args)
    with pytest.raises(ValueError, match=match):
        gemv_cuda.skinny_gemm(**args)


def test_fp32_needs_k_multiple_of_4_only():
    args = _cpu_args(k=12, dtype=FP32)   # passes every layout check, then wants a GPU
    with pytest.raises(ValueError, match="x must be on a CUDA device"):
        gemv_cuda.skinny_gemm(**args)
    args = _cpu_args(k=10, dtype=FP32)
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        gemv_cuda.skinny_gemm(**args)


@pytest.mark.parametrize("variant,match", [
    ({"ROWS": 2}, "variant must have exactly the keys"),
    ({"MMA": 0, "ROWS": 0, "WARPS": 4, "UNROLL": 4, "LOAD": 0}, r"variant ROWS must be in \[1, 8\] with MMA 0"),
    ({"MMA": 1, "ROWS": 2, "WARPS": 4, "UNROLL": 4, "LOAD": 0}, "variant ROWS must be 16 with MMA 1"),
    ({"MMA": 0, "ROWS": 2, "WARPS": 4, "UNROLL": 4, "LOAD": 3}, r"variant LOAD must be an int in \[0, 2\]"),
    ({"MMA": 2, "ROWS": 2, "WARPS": 4, "UNROLL": 4, "LOAD": 0}, r"variant MMA must be an int in \[0, 1\]"),
])
def test_launcher_rejects_bad_variant(variant, match):
    with pytest.raises(ValueError, match=match):
        gemv_cuda.skinny_gemm(**_cpu_args(), variant=variant)


def test_tensor_cores_need_16_bit_types():
    with pytest.raises(ValueError, match="MMA 1 .* needs float16 or bfloat16"):
        gemv_cuda.skinny_gemm(**_cpu_args(dtype=FP32), variant=MMA)
    assert gemv_cuda.default_variant(8, BF16)["MMA"] == 1
    assert gemv_cuda.default_variant(8, FP32)["MMA"] == 0


def test_sweep_and_default_variants_are_valid():
    defaults = [gemv_cuda.default_variant(m, dtype) for m in range(1, gemv_cuda.MAX_M + 1) for dtype in (BF16, FP32)]
    for v in gemv_cuda.SWEEP + defaults:
        gemv_cuda._check_variant(v)


# ---------------------------------------------------------------- ops.linear on CPU and the layers

@pytest.mark.parametrize("skinny", [False, True])
@pytest.mark.parametrize("dtype", [FP32, BF16])
@pytest.mark.parametrize("shape", [(16,), (3, 16), (2, 3, 16), (20, 16)])
def test_ops_linear_is_f_linear_on_cpu(monkeypatch, skinny, dtype, shape):
    set_kernel_options(monkeypatch, skinny_gemm=skinny)
    x = torch.randn(shape).to(dtype)
    w = torch.randn(24, 16).to(dtype)
    b = torch.randn(24).to(dtype)
    assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(ops.linear(x, w), F.linear(x, w))


def _skinny_case(change: str):
    """(x, weight, bias) for ops._skinny_rows, the accepted case changed in one way."""
    m = {"one_token": 1, "three_tokens": 3, "no_tokens": 0}.get(change, 2)
    x = torch.randn(m, 16, dtype=BF16)
    w = torch.randn(24, 16, dtype=BF16)
    b = torch.randn(24, dtype=BF16)
    if change == "leading_dims":
        x = x.view(1, 2, 16)
    elif change == "weight_dtype":
        w = w.float()
    elif change == "weight_strided":
        w = torch.randn(16, 24, dtype=BF16).t()
    elif change == "k_not_multiple":
        x, w = torch.randn(2, 12, dtype=BF16), torch.randn(24, 12, dtype=BF16)
    elif change == "bias_shape":
        b = torch.randn(12, dtype=BF16)
    elif change == "x_column_strided":
        x = torch.randn(16, 2, dtype=BF16).t()
    elif change == "needs_grad":
        w.requires_grad_(True)
    return x, w, b


@pytest.mark.parametrize("change, takes", [
    ("none", True), ("one_token", True), ("leading_dims", True), ("three_tokens", False), ("no_tokens", False),
    ("weight_dtype", False), ("weight_strided", False), ("k_not_multiple", False), ("bias_shape", False),
    ("x_column_strided", False), ("needs_grad", False)])
def test_skinny_rows_takes_only_what_the_kernel_serves(monkeypatch, change, takes):
    # The dispatch predicate on CPU tensors, as if they were CUDA ones (the launcher is not called).
    monkeypatch.setattr(ops, "_cuda", lambda t: True)
    x, w, b = _skinny_case(change)
    rows = ops._skinny_rows(x, w, b)
    assert (rows is not None) == takes
    if takes:
        assert rows.shape == (x.numel() // x.shape[-1], x.shape[-1]) and torch.equal(rows.reshape(x.shape), x)


def test_layers_and_logits_route_through_ops_linear(monkeypatch):
    from pagedray.models.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                               QKVParallelLinear, ReplicatedLinear, RowParallelLinear)
    from pagedray.models.layers.logits import LogitsProcessor
    from pagedray.models.layers.vocab_embedding import ParallelLMHead
    seen = []

    def spy(x, weight, bias=None):
        seen.append(weight)
        return F.linear(x, weight, bias)

    monkeypatch.setattr(ops, "linear", spy)
    layers = [ReplicatedLinear(16, 8), ColumnParallelLinear(16, 8), MergedColumnParallelLinear(16, [8, 8]),
              QKVParallelLinear(16, 4, 4, 2), RowParallelLinear(16, 8)]
    x = torch.randn(3, 16)
    for layer in layers:
        for p in layer.parameters():
            p.data.normal_()
        y = layer(x)
        assert seen[-1] is layer.weight
        torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))
    head = ParallelLMHead(100, 16)
    head.weight.data.normal_()
    logits = LogitsProcessor(100)(head, x)
    assert seen[-1] is head.weight and len(seen) == len(layers) + 1
    torch.testing.assert_close(logits, F.linear(x, head.weight)[:, :100])
