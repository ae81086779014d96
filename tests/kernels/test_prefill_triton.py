"""The Triton paged prefill kernel against the reference (prefill, chunked prefill, prefix hits, mixed)."""
from __future__ import annotations

import pytest
import torch
from testkit.kernel_cases import alibi_slopes, make_paged, set_kernel_options

from pagedray.kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (and Triton)")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TOL = {BF16: (2e-2, 1.6e-2, 1e-2), FP16: (2e-3, 2e-3, 2e-3), FP32: (1e-4, 1e-4, 1e-5)}
# (context length, new query tokens): decode, whole prompts, a prompt chunk, a prefix-cache hit
CASES = [(1, 1), (37, 37), (300, 100), (513, 1), (64, 64), (129, 17)]


def _prefill(dtype, heads, kv_heads, head_size, block_size, cases=CASES, window=None, alibi=False, cap=None):
    from pagedray.kernels.prefill_triton import paged_prefill
    torch.manual_seed(7)
    seq_lens = [c for c, _ in cases]
    query_lens = [q for _, q in cases]
    kc, vc, bt, _, _ = make_paged(seq_lens, kv_heads, head_size, block_size, dtype, "cuda")
    q = torch.randn(sum(query_lens), heads, head_size, device="cuda").to(dtype)
    slopes = alibi_slopes(heads).cuda() if alibi else None
    out = torch.full_like(q, float("nan"))
    got = paged_prefill(q, kc, vc, bt, seq_lens, query_lens, head_size ** -0.5, window, slopes, cap, out=out)
    want = reference.paged_attention(q, kc, vc, bt, seq_lens, query_lens, head_size ** -0.5, window, slopes, cap)
    atol, rtol, rel = TOL[dtype]
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    assert ((got.double() - want.double()).norm() / want.double().norm()) < rel


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_prefill_head_and_block_sizes(head_size, block_size):
    _prefill(BF16, 8, 2, head_size, block_size)


@pytest.mark.parametrize("head_size", [80, 128])
@pytest.mark.parametrize("dtype", [FP16, FP32])
def test_prefill_dtypes(dtype, head_size):
    _prefill(dtype, 8, 2, head_size, 16)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (28, 4), (32, 1)])
def test_prefill_gqa(heads, kv_heads):
    _prefill(BF16, heads, kv_heads, 128, 16)


@pytest.mark.parametrize("window,alibi,cap", [(50, False, None), (None, True, None), (None, False, 20.0),
                                              (33, True, 5.0)])
def test_prefill_window_alibi_softcap(window, alibi, cap):
    _prefill(BF16, 8, 2, 128, 16, window=window, alibi=alibi, cap=cap)


def test_prefill_decode_rows_only():
    _prefill(BF16, 8, 2, 128, 16, cases=[(5, 1), (900, 1), (17, 1)])


def test_ops_routes_mixed_steps_to_triton_when_selected(monkeypatch):
    from pagedray.kernels import ops, prefill_triton
    set_kernel_options(monkeypatch, prefill_backend="triton")
    calls = []
    real = prefill_triton.paged_prefill
    monkeypatch.setattr(prefill_triton, "paged_prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    seq_lens, query_lens = [40, 9, 130], [40, 1, 30]
    kc, vc, bt, _, _ = make_paged(seq_lens, 2, 64, 16, BF16, "cuda")
    q = torch.randn(sum(query_lens), 8, 64, device="cuda", dtype=BF16)
    got = ops.paged_attention(q, kc, vc, bt.long(), seq_lens, query_lens, 0.125)
    assert calls == [1]
    want = reference.paged_attention(q, kc, vc, bt, seq_lens, query_lens, 0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1.6e-2)


@pytest.mark.parametrize("window,alibi,cap", [(None, False, None), (50, True, 5.0)])
def test_ops_splits_a_mixed_step_between_the_decode_and_prefill_kernels(monkeypatch, window, alibi, cap):
    """Leading decode rows go to the decode kernel, the prompts after them to Triton; one output."""
    from pagedray.kernels import attention_cuda, ops, prefill_triton
    set_kernel_options(monkeypatch, prefill_backend="triton")
    calls = []
    real_prefill, real_decode = prefill_triton.paged_prefill, attention_cuda.paged_attention_decode
    monkeypatch.setattr(prefill_triton, "paged_prefill",
                        lambda q, *a, **k: calls.append(("prefill", q.shape[0])) or real_prefill(q, *a, **k))
    monkeypatch.setattr(attention_cuda, "paged_attention_decode",
                        lambda q, *a, **k: calls.append(("decode", q.shape[0])) or real_decode(q, *a, **k))
    torch.manual_seed(3)
    seq_lens, query_lens = [700, 9, 1, 300, 40, 513], [1, 1, 1, 300, 17, 64]
    kc, vc, bt, _, _ = make_paged(seq_lens, 2, 128, 16, BF16, "cuda")
    # A slice of a fused QKV projection, as the models pass it.
    q = torch.randn(sum(query_lens), 12, 128, device="cuda").to(BF16)[:, :8]
    slopes = alibi_slopes(8).cuda() if alibi else None
    got = ops.paged_attention(q, kc, vc, bt, seq_lens, query_lens, 0.125, window, slopes, cap,
                              seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"))
    assert calls == [("decode", 3), ("prefill", sum(query_lens) - 3)]
    want = reference.paged_attention(q, kc, vc, bt, seq_lens, query_lens, 0.125, window, slopes, cap)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1.6e-2)


def test_prefill_reads_its_tables_from_row_table_row0():
    """Mixed steps pass the whole block table and the row of the first prompt (a row slice would
    change the pointer's alignment from step to step, and Triton would recompile for it)."""
    from pagedray.kernels.prefill_triton import paged_prefill
    torch.manual_seed(5)
    seq_lens, query_lens = [300, 40], [100, 40]
    kc, vc, bt, _, _ = make_paged(seq_lens, 2, 128, 16, BF16, "cuda")
    junk = torch.full((3, bt.shape[1]), kc.shape[0] - 1, dtype=bt.dtype, device=bt.device)
    q = torch.randn(sum(query_lens), 8, 128, device="cuda").to(BF16)
    got = paged_prefill(q, kc, vc, torch.cat([junk, bt]), seq_lens, query_lens, 0.125, table_row0=3)
    want = reference.paged_attention(q, kc, vc, bt, seq_lens, query_lens, 0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1.6e-2)
    with pytest.raises(ValueError, match="table_row0"):
        paged_prefill(q, kc, vc, bt, seq_lens, query_lens, 0.125, table_row0=1)
