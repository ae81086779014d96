"""ops.rotary_and_cache and Attention(rotary=...) on CPU: which path runs, and that every path gives
rotary-then-cache-write's results (the fused kernel itself: tests/kernels/test_cuda_kernels.py)."""
from __future__ import annotations

import pytest
import torch
from testkit.kernel_cases import set_kernel_options
from testkit.tiny_models import allocate_block_tables, build_attn_metadata

from pagedray.kernels import elementwise, ops, reference
from pagedray.models.layers.attention import Attention
from pagedray.models.layers.rotary import get_rope

BF16 = torch.bfloat16
HEADS, KV_HEADS, D, BS = 4, 2, 16, 4


def _inputs(dtype=BF16, tokens=5):
    torch.manual_seed(0)
    qkv = torch.randn(tokens, HEADS + 2 * KV_HEADS, D).to(dtype)  # row-strided views, like a fused QKV
    q, k, v = qkv[:, :HEADS], qkv[:, HEADS:HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS:]
    caches = torch.full((2, 6, KV_HEADS, BS, D), float("nan"), dtype=dtype)
    slots = torch.tensor([3, -1, 9, 0, 22])[:tokens]
    return torch.tensor([7, 1, 0, 30, 5])[:tokens], q, k, v, caches, slots


def _fused_case(change: str):
    """ops._fused_rotary_cache_fits' arguments, the accepted case changed in one way."""
    _, q, k, v, caches, _ = _inputs()
    cs = get_rope(D, D, 64, 10000.0).cos_sin_cache
    key_cache = caches[0]
    if change == "key_dtype":
        k = k.float()
    elif change == "value_dtype":
        v = v.half()
    elif change == "cache_dtype":
        key_cache = key_cache.float()
    elif change == "cos_dtype":
        cs = cs.double()
    elif change == "cos_model_dtype":
        cs = cs.to(BF16)
    elif change == "empty_cache":
        key_cache = torch.empty(0, dtype=BF16)
    return q, k, v, cs, key_cache


@pytest.mark.parametrize("change, takes", [
    ("none", True), ("cos_model_dtype", True), ("key_dtype", False), ("value_dtype", False),
    ("cache_dtype", False), ("cos_dtype", False), ("empty_cache", False), ("flag_off", False)])
def test_fused_kernel_takes_only_what_it_serves(monkeypatch, change, takes):
    # The dispatch predicate on CPU tensors, as if they were CUDA ones (the launcher is not called).
    monkeypatch.setattr(ops, "_cuda", lambda t: True)
    set_kernel_options(monkeypatch, fused_rotary_cache=change != "flag_off")
    assert ops._fused_rotary_cache_fits(*_fused_case(change)) == takes


def test_cpu_never_takes_the_fused_kernel():
    assert not ops._fused_rotary_cache_fits(*_fused_case("none"))


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rot_dim", [D, D // 2])
def test_ops_rotary_and_cache_on_cpu_is_rotary_then_cache_write(monkeypatch, is_neox, rot_dim):
    monkeypatch.setattr(elementwise, "rotary_embedding_and_cache", None)  # must not be reached
    pos, q, k, v, caches, slots = _inputs()
    cs = get_rope(D, rot_dim, 64, 10000.0, is_neox_style=is_neox).cos_sin_cache
    want_caches = caches.clone()
    want_q, want_k = reference.rotary_embedding(pos, q, k, cs, is_neox)
    reference.reshape_and_cache(want_k, v, want_caches[0], want_caches[1], slots)
    q0, k0 = q.clone(), k.clone()
    got_q = ops.rotary_and_cache(pos, q, k, v, cs, is_neox, caches[0], caches[1], slots)
    assert torch.equal(got_q, want_q)
    torch.testing.assert_close(caches, want_caches, equal_nan=True, atol=0, rtol=0)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    ref_caches = torch.full_like(caches, float("nan"))
    assert torch.equal(reference.rotary_and_cache(pos, q, k, v, cs, is_neox, *ref_caches, slots), want_q)
    torch.testing.assert_close(ref_caches, want_caches, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("with_cache", [True, False])
def test_attention_with_rotary_is_rotary_then_attention(monkeypatch, with_cache):
    calls = []
    real = ops.rotary_and_cache
    monkeypatch.setattr(ops, "rotary_and_cache", lambda *a: calls.append(1) or real(*a))
    seq_lens, query_lens = [6, 3], [2, 3]
    meta, positions = build_attn_metadata(seq_lens, query_lens, allocate_block_tables(seq_lens, BS), BS)
    rope = get_rope(D, D, 64, 10000.0)
    attn = Attention(HEADS, D, D ** -0.5, KV_HEADS)
    torch.manual_seed(1)
    qkv = torch.randn(5, (HEADS + 2 * KV_HEADS) * D)
    q, k, v = qkv.split([HEADS * D, KV_HEADS * D, KV_HEADS * D], dim=-1)
    cache = torch.randn(2, 6, KV_HEADS, BS, D) if with_cache else torch.empty(0)
    want_cache = cache.clone()
    rq, rk = rope(positions, q, k)
    want = attn(rq, rk, v, want_cache, meta)
    got = attn(q, k, v, cache, meta, rotary=rope, positions=positions)
    assert calls == ([1] if with_cache else [])
    assert torch.equal(got, want) and torch.equal(cache, want_cache)
