"""The batched LoRA kernels (kernels/lora.py): the reference against a per-token loop, and on CUDA
the Triton shrink/expand and the dense path against the reference, eagerly and replayed from a
CUDA graph whose token -> slot indices (and mask) change in place between replays."""
from __future__ import annotations

import pytest
import torch

from pagedray.common.config import KernelOptions
from pagedray.kernels import options
from pagedray.kernels.lora import (lora_delta, lora_delta_dense, lora_expand_reference,
                                   lora_linear_dense, lora_path, lora_shrink_reference)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")


def _case(tokens: int, slots: int, rank: int, k: int, n: int, dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(device, dtype)
    a = (torch.randn(slots, rank, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = (torch.randn(slots, rank, n, generator=gen) / rank ** 0.5).to(device, dtype)
    idx = torch.randint(-1, slots, (tokens,), generator=gen, dtype=torch.int32)
    return x, a, b, idx.to(device), _order(idx).to(device), torch.randn(tokens, n, generator=gen).to(device, dtype)


def _mask(idx: torch.Tensor, slots: int, dtype) -> torch.Tensor:
    return (idx[:, None] == torch.arange(slots, device=idx.device)).to(dtype)


def _order(idx: torch.Tensor) -> torch.Tensor:
    return torch.argsort(idx.cpu(), stable=True).to(torch.int32)


def _per_token(y, x, a, b, idx) -> torch.Tensor:
    out = y.float().clone()
    for t, s in enumerate(idx.tolist()):
        if s >= 0:
            out[t] += (x[t].float() @ a[s].float().t()) @ b[s].float()
    return out


def test_reference_matches_a_per_token_loop():
    x, a, b, idx, order, y = _case(37, 3, 8, 24, 40, torch.float32, "cpu")
    got = lora_delta(y.clone(), x, a, b, idx, order)
    torch.testing.assert_close(got, _per_token(y, x, a, b, idx), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[idx < 0], y[idx < 0])   # rows without an adapter are untouched


def test_dense_path_matches_a_per_token_loop():
    x, a, b, idx, order, y = _case(37, 3, 8, 24, 40, torch.float32, "cpu", seed=1)
    mask = _mask(idx, 3, x.dtype)
    got = lora_delta_dense(y.clone(), x, a, b, mask)
    torch.testing.assert_close(got, _per_token(y, x, a, b, idx), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[idx < 0], y[idx < 0])   # a zero mask row adds exact zeros
    weight, bias = torch.randn(40, 24), torch.randn(40)
    for b_ in (None, bias):   # the fused form: the delta first, the base GEMM accumulating onto it
        base = torch.nn.functional.linear(x, weight, b_)
        fused = lora_linear_dense(x, weight, b_, a, b, mask)
        torch.testing.assert_close(fused, _per_token(base, x, a, b, idx), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        lora_delta_dense(y.clone(), x, a, b, _mask(idx, 2, x.dtype))


def test_path_is_chosen_by_the_kernel_options_and_the_shape():
    with options.override(lora_dense_min_tokens=2, lora_narrow_kernels_min_tokens=128,
                          lora_narrow_kernels_max_tokens=1024):
        assert lora_path(1, 4096, 28672) == "kernels"                     # one token: its adapter alone
        assert lora_path(2, 4096, 4096) == lora_path(127, 4096, 6144) == "fused"
        assert lora_path(64, 14336, 4096) == "dense"                      # narrow output, long reduction
        assert lora_path(64, 4096, 6144, quantized=True) == "dense"       # the layer's own product first
        assert lora_path(128, 4096, 6144) == lora_path(1023, 14336, 4096) == "kernels"   # narrow, mid-size
        assert lora_path(256, 4096, 28672) == lora_path(1024, 4096, 4096) == "fused"     # wide; many tokens
    with options.override(lora_dense_min_tokens=0, lora_narrow_kernels_min_tokens=0,
                          lora_narrow_kernels_max_tokens=0):
        assert lora_path(1, 4096, 4096) == lora_path(300, 4096, 4096) == "fused"
    with pytest.raises(ValueError, match="lora_narrow_kernels_min_tokens"):
        KernelOptions(lora_narrow_kernels_min_tokens=10, lora_narrow_kernels_max_tokens=5)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,slots,rank,k,n", [(1, 1, 16, 4096, 48), (256, 8, 32, 4096, 28672),
                                                  (100, 8, 48, 4096, 6144)])
def test_dense_matches_per_token_kernels(dtype, tokens, slots, rank, k, n):
    x, a, b, idx, order, y = _case(tokens, slots, rank, k, n, dtype, "cuda", seed=2)
    mask = _mask(idx, slots, dtype)
    dense = lora_delta_dense(y.clone(), x, a, b, mask)
    kernels = lora_delta(y.clone(), x, a, b, idx, order)
    rows = idx >= 0
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(dense.float()[rows], _per_token(y, x, a, b, idx)[rows], atol=10 * tol, rtol=tol)
    torch.testing.assert_close(dense.float(), kernels.float(), atol=10 * tol, rtol=tol)
    assert torch.equal(dense[~rows], y[~rows])
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(3)) / k ** 0.5).to("cuda", dtype)
    base = torch.nn.functional.linear(x, weight)
    fused = lora_linear_dense(x, weight, None, a, b, mask)
    torch.testing.assert_close(fused.float(), lora_delta_dense(base.clone(), x, a, b, mask).float(),
                               atol=10 * tol, rtol=tol)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,slots,rank,k,n", [(1, 1, 16, 4096, 48), (7, 4, 48, 512, 6144),
                                                  (256, 8, 32, 4096, 28672), (2048, 8, 16, 14336, 4096),
                                                  (33, 3, 48, 4096, 16), (100, 8, 16, 14336, 4096)])
def test_triton_matches_reference(dtype, tokens, slots, rank, k, n):
    from pagedray.kernels import lora_triton
    x, a, b, idx, order, y = _case(tokens, slots, rank, k, n, dtype, "cuda")
    rows = idx >= 0
    partials = lora_triton.lora_shrink(x, a, idx, order)
    ref = lora_shrink_reference(x, a, idx)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(partials.sum(0)[rows], ref[0][rows], atol=tol, rtol=tol)
    got = lora_triton.lora_expand(ref, b, idx, order, y.clone())
    want = lora_expand_reference(ref, b, idx, y.clone())
    torch.testing.assert_close(got.float(), want.float(), atol=5 * tol, rtol=tol)
    assert torch.equal(got[~rows], y[~rows])
    whole = lora_delta(y.clone(), x, a, b, idx, order)
    torch.testing.assert_close(whole.float()[rows], _per_token(y, x, a, b, idx)[rows], atol=10 * tol, rtol=tol)


@needs_cuda
@pytest.mark.parametrize("tokens,dense", [(8, False), (64, False), (64, True)])
def test_under_cuda_graph_follows_indices_changed_in_place(tokens, dense):
    slots = 4
    x, a, b, idx, order, y = _case(tokens, slots, 32, 4096, 2048, torch.bfloat16, "cuda")
    mask = _mask(idx, slots, x.dtype)

    def delta(out):
        if dense:
            return lora_delta_dense(out, x, a, b, mask)
        return lora_delta(out, x, a, b, idx, order)
    out = y.clone()
    delta(out)   # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        delta(out)
    for seed in range(3):
        new_idx = torch.randint(-1, slots, (tokens,), generator=torch.Generator().manual_seed(100 + seed),
                                dtype=torch.int32)
        idx.copy_(new_idx.cuda())
        order.copy_(_order(new_idx).cuda())
        mask.copy_(_mask(new_idx, slots, x.dtype))
        out.copy_(y)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, delta(y.clone()), atol=0, rtol=0)
        rows = new_idx.cuda() >= 0
        torch.testing.assert_close(out[rows].float(), _per_token(y, x, a, b, idx)[rows], atol=0.3, rtol=3e-2)
        assert torch.equal(out[~rows], y[~rows])
