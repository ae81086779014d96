"""The batched LoRA matmul (kernels/lora.py): the reference against a per-token loop, and on CUDA
the Triton kernel against the reference, eagerly and replayed from a CUDA graph."""
from __future__ import annotations

import pytest
import torch

from pagedray.kernels.lora import lora_delta, lora_matmul, lora_matmul_reference

needs_triton = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")


def _case(tokens: int, slots: int, rank: int, k: int, n: int, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(device, dtype)
    a = (torch.randn(slots, rank, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = (torch.randn(slots, n, rank, generator=gen) / rank ** 0.5).to(device, dtype)
    idx = torch.randint(-1, slots, (tokens,), generator=gen, dtype=torch.int32).to(device)
    order = torch.argsort(idx.cpu(), stable=True).to(torch.int32).to(device)
    y = torch.randn(tokens, n, generator=gen).to(device, dtype)
    return x, a, b, idx, order, y


def _per_token(y, x, a, b, idx):
    out = y.float().clone()
    for t, s in enumerate(idx.tolist()):
        if s >= 0:
            out[t] += (x[t].float() @ a[s].float().t()) @ b[s].float().t()
    return out


def test_reference_matches_a_per_token_loop():
    x, a, b, idx, order, y = _case(37, 3, 8, 24, 40, torch.float32, "cpu")
    expected = _per_token(y, x, a, b, idx)
    torch.testing.assert_close(lora_delta(y.clone(), x, a, b, idx, order), expected, atol=1e-5, rtol=1e-5)
    untouched = idx < 0
    assert torch.equal(lora_delta(y.clone(), x, a, b, idx, order)[untouched], y[untouched])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,slots,rank,k,n", [(1, 1, 16, 4096, 48), (7, 4, 48, 512, 6144),
                                                  (256, 8, 32, 4096, 14336), (2048, 8, 16, 14336, 4096),
                                                  (33, 3, 48, 4096, 16)])
def test_triton_matches_reference(dtype, tokens, slots, rank, k, n):
    x, a, b, idx, order, y = _case(tokens, slots, rank, k, n, dtype, "cuda")
    for w, inp, width in ((a, x, rank), (b, x[:, :rank].contiguous(), n)):
        out = torch.zeros(tokens, width, dtype=dtype, device="cuda")
        got = lora_matmul(inp, w, idx, order, out.clone(), accumulate=False)
        ref = lora_matmul_reference(inp, w, idx, out.clone(), accumulate=False)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, ref, atol=tol * (k ** 0.5 if w is a else 1), rtol=tol)
    got = lora_delta(y.clone(), x, a, b, idx, order)
    ref = y.clone()
    rows = idx >= 0
    ref[rows] = _per_token(y, x, a, b, idx)[rows].to(dtype)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@needs_triton
def test_triton_under_cuda_graph_follows_indices_changed_in_place():
    tokens, slots = 64, 4
    x, a, b, idx, order, y = _case(tokens, slots, 32, 1024, 2048, torch.bfloat16, "cuda")
    idx_buf, order_buf, x_buf, y_buf = idx.clone(), order.clone(), x.clone(), y.clone()
    lora_delta(y_buf.clone(), x_buf, a, b, idx_buf, order_buf)   # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    out = y_buf.clone()
    with torch.cuda.graph(graph):
        lora_delta(out, x_buf, a, b, idx_buf, order_buf)
    for seed in range(3):
        gen = torch.Generator().manual_seed(100 + seed)
        new_idx = torch.randint(-1, slots, (tokens,), generator=gen, dtype=torch.int32)
        idx_buf.copy_(new_idx.cuda())
        order_buf.copy_(torch.argsort(new_idx, stable=True).to(torch.int32).cuda())
        out.copy_(y_buf)
        graph.replay()
        expected = lora_delta(y_buf.clone(), x_buf, a, b, idx_buf, order_buf)   # eager, same kernel
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        rows = new_idx.cuda() >= 0
        per_token = _per_token(y_buf, x_buf, a, b, idx_buf)
        torch.testing.assert_close(out[rows].float(), per_token[rows], atol=5e-2, rtol=5e-2)
