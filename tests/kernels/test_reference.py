"""The PyTorch references (the CUDA kernels' oracle) against independent formulations, on CPU."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from testkit.kernel_cases import alibi_slopes, dense_attention, make_paged

from pagedray.kernels import ops, reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _flat_case(seq_lens, query_lens, num_heads, num_kv_heads, head_size, block_size):
    kc, vc, bt, keys, values = make_paged(seq_lens, num_kv_heads, head_size, block_size, torch.float32)
    query = torch.randn(sum(query_lens), num_heads, head_size)
    return query, kc, vc, bt, keys, values


def _dense_flat(query, keys, values, query_lens, scale, **kw):
    outs, start = [], 0
    for k, v, q_len in zip(keys, values, query_lens):
        outs.append(dense_attention(query[start:start + q_len], k, v, scale, **kw))
        start += q_len
    return torch.cat(outs)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("block_size", [8, 16])
def test_paged_attention_matches_dense_causal(num_heads, num_kv_heads, block_size):
    # decode rows, a whole prompt, a chunk of a prompt, and a prefix-cache hit in one batch
    seq_lens, query_lens = [1, 37, 50, 23, 9], [1, 37, 16, 5, 1]
    query, kc, vc, bt, keys, values = _flat_case(seq_lens, query_lens, num_heads, num_kv_heads, 32, block_size)
    scale = 32 ** -0.5
    out = reference.paged_attention(query, kc, vc, bt, seq_lens, query_lens, scale)
    want = _dense_flat(query, keys, values, query_lens, scale)
    assert not out.isnan().any()  # padding and tails are NaN in the cache: nothing reads them
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,alibi,cap", [(7, False, None), (None, True, None), (None, False, 5.0),
                                              (12, True, 3.0)])
def test_paged_attention_window_alibi_softcap(window, alibi, cap):
    seq_lens, query_lens = [40, 29, 3], [1, 29, 2]
    query, kc, vc, bt, keys, values = _flat_case(seq_lens, query_lens, 4, 2, 16, 8)
    slopes = alibi_slopes(4) if alibi else None
    kw = dict(sliding_window=window, alibi_slopes=slopes, logits_soft_cap=cap)
    out = reference.paged_attention(query, kc, vc, bt, seq_lens, query_lens, 0.3, **kw)
    torch.testing.assert_close(out.double(), _dense_flat(query, keys, values, query_lens, 0.3, **kw),
                               atol=1e-5, rtol=1e-5)


def test_dense_oracle_matches_sdpa():
    """The test oracle itself against PyTorch's SDPA (no GQA, plain causal)."""
    q, k, v = torch.randn(5, 3, 16), torch.randn(9, 3, 16), torch.randn(9, 3, 16)
    mask = torch.ones(5, 9, dtype=torch.bool).tril(diagonal=4)
    want = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(dense_attention(q, k, v, 16 ** -0.5).float(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("partition_size", [8, 32, 64, 1000])
@pytest.mark.parametrize("window,alibi,cap", [(None, False, None), (20, True, None), (5, False, 4.0)])
def test_split_decode_reference_equals_unsplit(partition_size, window, alibi, cap):
    seq_lens = [1, 8, 33, 100, 64]
    query, kc, vc, bt, _, _ = _flat_case(seq_lens, [1] * 5, 8, 2, 16, 8)
    kw = dict(sliding_window=window, alibi_slopes=alibi_slopes(8) if alibi else None, logits_soft_cap=cap)
    split = reference.paged_decode_split(query, kc, vc, bt, seq_lens, 0.25, partition_size, **kw)
    whole = reference.paged_attention(query, kc, vc, bt, seq_lens, [1] * 5, 0.25, **kw)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=1e-5)


def test_reshape_and_cache_writes_slots_and_skips_minus_one():
    key, value = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    kc = torch.full((4, 2, 4, 8), float("nan"))
    vc = torch.full((4, 2, 4, 8), float("nan"))
    slots = torch.tensor([13, -1, 0, 6, -1])
    reference.reshape_and_cache(key, value, kc, vc, slots)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(kc[slot // 4, :, slot % 4], key[t])
            assert torch.equal(vc[slot // 4, :, slot % 4], value[t])
    assert int((~kc.isnan()).sum()) == 3 * 2 * 8  # only the three real tokens were written


def _rotate_gptj_complex(x, cos_sin, positions):
    """GPT-J rotation as complex multiplication of (even, odd) pairs by e^{i*theta}."""
    rd = cos_sin.shape[1]
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    z = torch.view_as_complex(x[..., :rd].double().reshape(*x.shape[:-1], rd // 2, 2).contiguous())
    rot = torch.view_as_real(z * torch.complex(cos.double(), sin.double())[:, None]).flatten(-2)
    return torch.cat([rot.to(x.dtype), x[..., rd:]], dim=-1)


def _cos_sin(max_pos, rot_dim):
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2).float() / rot_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


@pytest.mark.parametrize("rot_dim", [32, 16])
def test_rotary_neox_equals_gptj_on_permuted_channels(rot_dim):
    head_size = 32
    positions = torch.tensor([0, 5, 17, 99])
    cs = _cos_sin(128, rot_dim)
    q, k = torch.randn(4, 3, head_size), torch.randn(4, 1, head_size)
    # GPT-J pairs (2j, 2j+1); NeoX pairs (j, j + rd/2): moving even channels first maps one onto the other.
    perm = torch.cat([torch.arange(0, rot_dim, 2), torch.arange(1, rot_dim, 2), torch.arange(rot_dim, head_size)])
    gq, gk = reference.rotary_embedding(positions, q, k, cs, is_neox=False)
    nq, nk = reference.rotary_embedding(positions, q[..., perm], k[..., perm], cs, is_neox=True)
    torch.testing.assert_close(nq, gq[..., perm])
    torch.testing.assert_close(nk, gk[..., perm])
    torch.testing.assert_close(gq, _rotate_gptj_complex(q, cs, positions))
    assert torch.equal(gq[..., rot_dim:], q[..., rot_dim:])  # channels past rotary_dim untouched
    assert not torch.equal(gq[1:, :, :rot_dim], q[1:, :, :rot_dim])


def test_rotary_returns_new_tensors_and_keeps_inputs():
    q, k = torch.randn(2, 2, 16), torch.randn(2, 2, 16)
    q0, k0 = q.clone(), k.clone()
    rq, rk = reference.rotary_embedding(torch.tensor([3, 4]), q, k, _cos_sin(8, 16), True)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    assert rq.shape == q.shape and rk.shape == k.shape
    # rotation preserves each pair's norm
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))


def test_rms_norm_and_fused_add():
    x, r, w = torch.randn(3, 64).to(torch.bfloat16), torch.randn(3, 64).to(torch.bfloat16), torch.randn(64)
    want = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    torch.testing.assert_close(reference.rms_norm(x, w, 1e-6).double(), want, atol=2e-2, rtol=1e-2)
    x0, r0 = x.clone(), r.clone()
    normed, res = reference.fused_add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(x, x0) and torch.equal(r, r0)
    assert torch.equal(res, (x.float() + r.float()).to(torch.bfloat16))
    assert torch.equal(normed, reference.rms_norm(res, w, 1e-6))


def test_gated_activations_closed_forms():
    x = torch.randn(4, 2 * 24, dtype=torch.float64)
    g, u = x[:, :24], x[:, 24:]
    close = dict(atol=1e-5, rtol=1e-5)  # the references compute in float32
    torch.testing.assert_close(reference.silu_and_mul(x), g / (1 + torch.exp(-g)) * u, **close)
    erf_gelu = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
    tanh_gelu = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
    torch.testing.assert_close(reference.gelu_and_mul(x), erf_gelu * u, **close)
    torch.testing.assert_close(reference.gelu_and_mul(x, "tanh"), tanh_gelu * u, **close)


def test_copy_blocks_copies_k_and_v_in_every_layer():
    caches = [torch.randn(2, 6, 2, 4, 8) for _ in range(3)]
    before = [c.clone() for c in caches]
    reference.copy_blocks(caches, [(1, 4), (2, 0)])
    for c, b in zip(caches, before):
        assert torch.equal(c[:, 4], b[:, 1]) and torch.equal(c[:, 0], b[:, 2])
        assert torch.equal(c[:, [1, 2, 3, 5]], b[:, [1, 2, 3, 5]])


def test_ops_on_cpu_use_the_reference():
    seq_lens, query_lens = [9, 4], [1, 1]
    query, kc, vc, bt, _, _ = _flat_case(seq_lens, query_lens, 4, 2, 16, 8)
    got = ops.paged_attention(query, kc, vc, bt, seq_lens, query_lens, 0.5,
                              seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32))
    assert torch.equal(got, reference.paged_attention(query, kc, vc, bt, seq_lens, query_lens, 0.5))
    x = torch.randn(3, 16)
    assert torch.equal(ops.silu_and_mul(x), reference.silu_and_mul(x))
