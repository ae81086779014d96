"""Every CUDA kernel against its PyTorch reference on fresh random inputs.

Outputs (and the split-mode scratch buffers) are filled with NaN before each
run, and cache slots no sequence owns hold NaN, so an unwritten element or a
read past a sequence's end fails the comparison.
"""
from __future__ import annotations

import pytest
import torch
from testkit.kernel_cases import alibi_slopes, make_paged, set_kernel_options

from pagedray.kernels import attention_cuda, cache_ops, cuda_available, elementwise, ops, reference

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_available()),
                                reason="needs a CUDA device and CuPy")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
NAN = float("nan")
TOL = {BF16: (2e-2, 1.6e-2, 1e-2), FP16: (2e-3, 2e-3, 2e-3), FP32: (1e-4, 1e-4, 1e-5)}  # atol, rtol, rel-norm


def _nan_empty(*shape, dtype=None, device=None, **kw):
    t = torch.empty(*shape, dtype=dtype, device=device, **kw)
    return t.fill_(NAN) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def _poison_and_seed(monkeypatch):
    monkeypatch.setattr(attention_cuda, "_empty", _nan_empty)
    monkeypatch.setattr(elementwise, "_empty", _nan_empty)
    torch.manual_seed(1234)


def check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol, rel = TOL[dtype]
    assert not got.isnan().any(), "NaN in the kernel's output: an element was not written or read garbage"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
    assert err < rel, f"relative error {err:.2e} >= {rel}"


# ---------------------------------------------------------------- decode paged attention

def _decode(dtype, heads, kv_heads, head_size, block_size, seq_lens, partition_size, window=None,
            alibi=False, cap=None, strided_query=False):
    kc, vc, bt, _, _ = make_paged(seq_lens, kv_heads, head_size, block_size, dtype, "cuda")
    num_seqs = len(seq_lens)
    if strided_query:  # a slice of a fused QKV projection: rows are further apart than H*D
        q = torch.randn(num_seqs, heads + 2 * kv_heads, head_size, device="cuda").to(dtype)[:, :heads]
    else:
        q = torch.randn(num_seqs, heads, head_size, device="cuda").to(dtype)
    slopes = alibi_slopes(heads).cuda() if alibi else None
    scale = head_size ** -0.5
    out = torch.full_like(q, NAN, memory_format=torch.contiguous_format)
    got = attention_cuda.paged_attention_decode(
        q, kc, vc, bt, torch.tensor(seq_lens, dtype=torch.int32, device="cuda"), scale,
        max_seq_len=max(seq_lens), sliding_window=window, alibi_slopes=slopes, logits_soft_cap=cap,
        out=out, partition_size=partition_size)
    assert got.data_ptr() == out.data_ptr()
    want = reference.paged_attention(q, kc, vc, bt, seq_lens, [1] * num_seqs, scale, window, slopes, cap)
    check(got, want, dtype)


SEQS = [1, 7, 16, 33, 200, 513, 1000]


@pytest.mark.parametrize("partition_size", [0, 64])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
def test_decode_head_and_block_sizes(head_size, block_size, partition_size):
    _decode(BF16, 8, 2, head_size, block_size, SEQS, partition_size)


@pytest.mark.parametrize("partition_size", [0, 128])
@pytest.mark.parametrize("head_size", [80, 128])
@pytest.mark.parametrize("dtype", [FP16, FP32])
def test_decode_dtypes(dtype, head_size, partition_size):
    _decode(dtype, 8, 2, head_size, 16, SEQS, partition_size)


@pytest.mark.parametrize("partition_size", [0, 64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 4), (12, 4), (28, 4), (16, 2), (32, 1)])
def test_decode_gqa_and_mqa(heads, kv_heads, partition_size):
    _decode(BF16, heads, kv_heads, 128, 16, SEQS, partition_size, strided_query=True)


@pytest.mark.parametrize("partition_size", [0, 32])
@pytest.mark.parametrize("window,alibi,cap", [(64, False, None), (300, False, None), (None, True, None),
                                              (None, False, 30.0), (100, True, 10.0)])
def test_decode_window_alibi_softcap(window, alibi, cap, partition_size):
    _decode(BF16, 8, 2, 128, 16, SEQS, partition_size, window, alibi, cap)
    _decode(FP32, 4, 4, 64, 8, [3, 90, 700], partition_size, window, alibi, cap)


# The default grid above runs the launcher's default variant; these cover the others.
VARIANTS = [{"SCORE_XPOSE": 0, "PREFETCH": 0}, {"SCORE_XPOSE": 1, "PREFETCH": 0}, {"SCORE_XPOSE": 0, "PREFETCH": 1},
            {"SCORE_XPOSE": 1, "PREFETCH": 1}, {"NUM_WARPS": 2, "PREFETCH": 0, "TPG_MAX": 4},
            {"NUM_WARPS": 8, "PREFETCH": 1, "TPG_MAX": 2}, {"NUM_WARPS": 1, "TPG_MAX": 1},
            {"NUM_WARPS": 8, "PREFETCH": 0}]
VARIANT_CASES = [  # (dtype, heads, kv_heads, head_size, block_size, window, alibi, cap): every lane layout
    (BF16, 8, 2, 64, 8, None, False, None), (BF16, 8, 2, 80, 32, None, False, None),
    (BF16, 8, 2, 96, 8, None, False, None), (BF16, 8, 2, 256, 16, None, False, None),
    (FP32, 8, 2, 128, 16, None, False, None), (FP32, 4, 2, 256, 32, None, False, None),
    (FP16, 8, 2, 128, 32, None, False, None), (BF16, 28, 4, 128, 16, None, False, None),
    (BF16, 32, 1, 128, 16, None, False, None), (BF16, 12, 4, 128, 8, None, False, None),
    (BF16, 4, 4, 128, 16, None, False, None), (BF16, 8, 2, 128, 16, 100, True, 10.0),
]


@pytest.mark.parametrize("partition_size", [0, 64])
@pytest.mark.parametrize("case", VARIANT_CASES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_decode_kernel_variants(monkeypatch, variant, case, partition_size):
    set_kernel_options(monkeypatch, attention_variant=variant)
    dtype, heads, kv_heads, head_size, block_size, window, alibi, cap = case
    _decode(dtype, heads, kv_heads, head_size, block_size, SEQS, partition_size, window, alibi, cap)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_decode_large_batch_takes_the_many_cta_variant(dtype):
    seq_lens = torch.randint(1, 700, (300,), generator=torch.Generator().manual_seed(5)).tolist()
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert 300 * 32 // attention_cuda.heads_per_cta(4) >= attention_cuda.MANY_CTAS_PER_SM * num_sms
    _decode(dtype, 32, 8, 128, 16, seq_lens, None, strided_query=True)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_decode_batch_one_takes_the_few_cta_variant(dtype):
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert 32 // attention_cuda.heads_per_cta(4) < num_sms
    _decode(dtype, 32, 8, 128, 16, [300], None, strided_query=True)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_decode_long_contexts_take_the_split_path(dtype):
    seq_lens = [16384, 9000, 4097, 1]
    hpb = attention_cuda.heads_per_cta(32 // 8)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert attention_cuda.use_split(len(seq_lens) * 32 // hpb, max(seq_lens), num_sms)
    _decode(dtype, 32, 8, 128, 16, seq_lens, None)
    _decode(dtype, 32, 8, 128, 16, seq_lens, 0)  # one pass over 16K tokens agrees too


@pytest.mark.parametrize("partition_size", [0, 64])
def test_decode_empty_sequence_gives_zeros(partition_size):
    kc, vc, bt, _, _ = make_paged([0, 70], 2, 64, 16, BF16, "cuda")
    q = torch.randn(2, 4, 64, device="cuda", dtype=BF16)
    out = attention_cuda.paged_attention_decode(q, kc, vc, bt, torch.tensor([0, 70], dtype=torch.int32,
                                                device="cuda"), 0.125, max_seq_len=70,
                                                partition_size=partition_size)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    check(out[1:], reference.paged_attention(q[1:], kc, vc, bt[1:], [70], [1], 0.125), BF16)


def test_decode_step_replays_in_a_cuda_graph():
    """Cache write + decode captured once (grid sized for max_seq_len) and replayed on new lengths."""
    heads, kv_heads, d, bs, max_len = 8, 2, 128, 16, 256
    kc, vc, bt, _, _ = make_paged([max_len] * 3, kv_heads, d, bs, BF16, "cuda")
    q = torch.empty(3, heads, d, device="cuda", dtype=BF16)
    k_new = torch.empty(3, kv_heads, d, device="cuda", dtype=BF16)
    v_new = torch.empty_like(k_new)
    slots = torch.empty(3, dtype=torch.int64, device="cuda")
    seq_lens = torch.empty(3, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)

    def step():
        ops.reshape_and_cache(k_new, v_new, kc, vc, slots)
        out.copy_(attention_cuda.paged_attention_decode(q, kc, vc, bt, seq_lens, d ** -0.5, max_seq_len=max_len))

    def fill(lens):
        q.normal_()
        k_new.normal_()
        v_new.normal_()
        seq_lens.copy_(torch.tensor(lens))
        pos = [n - 1 for n in lens]
        slot_list = [int(bt[i, p // bs]) * bs + p % bs if i != 1 else -1 for i, p in enumerate(pos)]
        slots.copy_(torch.tensor(slot_list))  # sequence 1 is padding: its write is skipped

    fill([40, 41, 42])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for lens in ([5, 100, 256], [200, 17, 1]):
        fill(lens)
        k_ref, v_ref = kc.clone(), vc.clone()
        reference.reshape_and_cache(k_new, v_new, k_ref, v_ref, slots)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(kc, k_ref, equal_nan=True, atol=0, rtol=0)
        want = reference.paged_attention(q, k_ref, v_ref, bt, lens, [1, 1, 1], d ** -0.5)
        check(out, want, BF16)


# ---------------------------------------------------------------- cache ops

@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_size", [64, 80, 128, 256])
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_reshape_and_cache(dtype, head_size, block_size):
    tokens, kv_heads, num_blocks = 37, 4, 20
    qkv = torch.randn(tokens, 8 + 2 * kv_heads, head_size, device="cuda").to(dtype)
    key, value = qkv[:, 8:8 + kv_heads], qkv[:, 8 + kv_heads:]  # row-strided views, like a fused QKV
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
    slots[::5] = -1
    kc = torch.full((num_blocks, kv_heads, block_size, head_size), NAN, device="cuda", dtype=dtype)
    vc = torch.full_like(kc, NAN)
    k_ref, v_ref = kc.clone(), vc.clone()
    cache_ops.reshape_and_cache(key, value, kc, vc, slots)
    reference.reshape_and_cache(key, value, k_ref, v_ref, slots)
    torch.testing.assert_close(kc, k_ref, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(vc, v_ref, equal_nan=True, atol=0, rtol=0)


def test_reshape_and_cache_unaligned_rows_use_narrow_accesses():
    flat = torch.randn(9, 2 * 64 + 1, device="cuda", dtype=BF16)  # odd row stride: 2-byte accesses only
    key = flat[:, 1:129].view(9, 2, 64)
    slots = torch.tensor([3, -1, 0, 40, 41, 12, 7, -1, 63], device="cuda")
    kc = torch.full((4, 2, 16, 64), NAN, device="cuda", dtype=BF16)
    vc, k_ref, v_ref = kc.clone(), kc.clone(), kc.clone()
    cache_ops.reshape_and_cache(key, key, kc, vc, slots)
    reference.reshape_and_cache(key, key, k_ref, v_ref, slots)
    torch.testing.assert_close(kc, k_ref, equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_copy_blocks(dtype):
    caches = [torch.randn(2, 12, 4, 16, 80, device="cuda").to(dtype) for _ in range(3)]
    pairs = [(0, 5), (3, 11), (7, 1), (2, 4)]
    refs = [c.clone() for c in caches]
    cache_ops.copy_blocks(caches, pairs)
    reference.copy_blocks(refs, pairs)
    for c, r in zip(caches, refs):
        assert torch.equal(c, r)


# ---------------------------------------------------------------- norms, rotary, activations

@pytest.mark.parametrize("hidden", [64, 4096, 4100, 40000])
@pytest.mark.parametrize("weight_fp32", [False, True])
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_rms_norm_and_fused_add(dtype, weight_fp32, hidden):
    wide = torch.randn(7, hidden + 64, device="cuda").to(dtype)
    x = wide[:, :hidden]  # row-strided input
    residual = torch.randn(7, hidden, device="cuda").to(dtype)
    w = torch.randn(hidden, device="cuda").to(FP32 if weight_fp32 else dtype)
    check(elementwise.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), dtype)
    x0, r0 = x.clone(), residual.clone()
    normed, res = elementwise.fused_add_rms_norm(x, residual, w, 1e-5)
    want_normed, want_res = reference.fused_add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(res, want_res)  # float add rounded once: bit-identical
    check(normed, want_normed, dtype)
    assert torch.equal(x, x0) and torch.equal(residual, r0)


def test_rms_norm_3d_input():
    x = torch.randn(2, 5, 256, device="cuda", dtype=BF16)
    w = torch.randn(256, device="cuda", dtype=BF16)
    check(elementwise.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), BF16)


def _cos_sin(max_pos, rot_dim, dtype):
    inv = 1.0 / (10000 ** (torch.arange(0, rot_dim, 2, device="cuda").float() / rot_dim))
    freqs = torch.outer(torch.arange(max_pos, device="cuda").float(), inv)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("rot_dim", [128, 64])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype,cache_dtype", [(BF16, FP32), (BF16, BF16), (FP16, FP32), (FP32, FP32)])
def test_rotary_embedding(dtype, cache_dtype, is_neox, rot_dim, inplace):
    tokens, heads, kv_heads, d = 19, 8, 2, 128
    qkv = torch.randn(tokens, heads + 2 * kv_heads, d, device="cuda").to(dtype)
    q, k = qkv[:, :heads], qkv[:, heads:heads + kv_heads]
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    cs = _cos_sin(4096, rot_dim, cache_dtype)
    want_q, want_k = reference.rotary_embedding(positions, q, k, cs, is_neox)
    got_q, got_k = elementwise.rotary_embedding(positions, q, k, cs, is_neox, inplace=inplace)
    if inplace:
        assert got_q.data_ptr() == q.data_ptr() and torch.equal(got_q, q)
    check(got_q, want_q, dtype)
    check(got_k, want_k, dtype)


def _rotary_cache_case(dtype, cache_dtype, head_size, rot_dim, block_size, tokens, aligned=True):
    """q/k/v as row-strided views of one fused QKV output (one element off 16 bytes when not aligned),
    NaN caches, slots with -1 holes. Returns (positions, q, k, v, cos_sin, kc, vc, slots)."""
    heads, kv_heads, num_blocks = 8, 2, 12
    width = (heads + 2 * kv_heads) * head_size
    flat = torch.randn(tokens, width + 8, device="cuda").to(dtype)  # rows 16-byte aligned in every dtype
    start = 0 if aligned else 1
    qkv = flat[:, start:start + width].view(tokens, heads + 2 * kv_heads, head_size)
    q, k, v = qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
    positions = torch.randint(0, 4096, (tokens,), device="cuda")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens]
    slots[1::3] = -1
    kc = torch.full((num_blocks, kv_heads, block_size, head_size), NAN, device="cuda", dtype=dtype)
    return positions, q, k, v, _cos_sin(4096, rot_dim, cache_dtype), kc, torch.full_like(kc, NAN), slots


@pytest.mark.parametrize("tokens", [1, 37])
@pytest.mark.parametrize("head_size,rot_dim,block_size,aligned", [
    (128, 128, 16, True), (128, 96, 16, True), (128, 128, 8, False), (80, 20, 32, True)])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("dtype,cache_dtype", [(BF16, FP32), (BF16, BF16), (FP16, FP32), (FP32, FP32)])
def test_rotary_embedding_and_cache(dtype, cache_dtype, is_neox, head_size, rot_dim, block_size, aligned,
                                    tokens):
    # 16-byte packs (128/128, 128/96 partial), the one-element path (unaligned rows; 80/20's half
    # of 10), and both compared bit for bit with the references and with the two unfused kernels.
    pos, q, k, v, cs, kc, vc, slots = _rotary_cache_case(dtype, cache_dtype, head_size, rot_dim, block_size,
                                                         tokens, aligned)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    k_ref, v_ref = kc.clone(), vc.clone()
    want_q = reference.rotary_and_cache(pos, q, k, v, cs, is_neox, k_ref, v_ref, slots)
    got_q = elementwise.rotary_embedding_and_cache(pos, q, k, v, cs, is_neox, kc, vc, slots)
    assert got_q.shape == q.shape and got_q.is_contiguous()
    assert torch.equal(got_q, want_q)
    torch.testing.assert_close(kc, k_ref, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(vc, v_ref, equal_nan=True, atol=0, rtol=0)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)
    k_two, v_two = torch.full_like(kc, NAN), torch.full_like(vc, NAN)
    two_q, two_k = elementwise.rotary_embedding(pos, q, k, cs, is_neox)
    cache_ops.reshape_and_cache(two_k, v, k_two, v_two, slots)
    assert torch.equal(got_q, two_q)
    torch.testing.assert_close(kc, k_two, equal_nan=True, atol=0, rtol=0)
    torch.testing.assert_close(vc, v_two, equal_nan=True, atol=0, rtol=0)


def test_rotary_and_cache_packs_when_aligned():
    pos, q, k, v, cs, kc, vc, _ = _rotary_cache_case(BF16, FP32, 128, 128, 16, 3)
    assert elementwise._rotary_pack(128, 128, q, k, v, kc, vc, cs) == 8
    assert elementwise._rotary_pack(20, 80, q, k, v, kc, vc, cs) == 1
    _, qu, ku, vu, _, _, _, _ = _rotary_cache_case(BF16, FP32, 128, 128, 16, 3, aligned=False)
    assert elementwise._rotary_pack(128, 128, qu, ku, vu, kc, vc, cs) == 1


def test_attention_rotary_fused_matches_unfused_and_replays_in_a_graph(monkeypatch):
    # Through the model-facing path: Attention(rotary=...) on a decode batch, fused vs the fused_rotary_cache option off.
    from pagedray.models.layers.attention import Attention, AttentionMetadata
    from pagedray.models.layers.rotary import RotaryEmbedding
    heads, kv_heads, d, bs = 32, 8, 128, 16
    seq_lens = [9, 40]
    kc, vc, bt, _, _ = make_paged(seq_lens, kv_heads, d, bs, BF16, "cuda")
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    rope = RotaryEmbedding(d, d, inv, 4096).cuda()
    attn = Attention(heads, d, d ** -0.5, kv_heads)
    qkv = torch.randn(2, (heads + 2 * kv_heads) * d, device="cuda", dtype=BF16)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    slots = torch.stack([bt[i, (n - 1) // bs].long() * bs + (n - 1) % bs for i, n in enumerate(seq_lens)])
    meta = AttentionMetadata(slots, bt, torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
                             torch.tensor([0, 1, 2], dtype=torch.int32, device="cuda"), seq_lens, [1, 1], 1, 40)
    positions = torch.tensor([n - 1 for n in seq_lens], device="cuda")
    calls = []
    real = elementwise.rotary_embedding_and_cache
    monkeypatch.setattr(elementwise, "rotary_embedding_and_cache", lambda *a: calls.append(1) or real(*a))
    outs, caches = [], []
    for fused in (True, False):
        set_kernel_options(monkeypatch, fused_rotary_cache=fused)
        cache = torch.stack([kc, vc]).clone()
        outs.append(attn(q, k, v, cache, meta, rotary=rope, positions=positions))
        caches.append(cache)
    assert calls == [1]
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(caches[0], caches[1], equal_nan=True, atol=0, rtol=0)
    set_kernel_options(monkeypatch, fused_rotary_cache=True)
    cache = torch.stack([kc, vc]).clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attn(q, k, v, cache, meta, rotary=rope, positions=positions)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, outs[0])
    torch.testing.assert_close(cache, caches[0], equal_nan=True, atol=0, rtol=0)


@pytest.mark.parametrize("d", [11008, 13])
@pytest.mark.parametrize("act", ["silu", "none", "tanh"])
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
def test_gated_activations(dtype, act, d):
    x = torch.randn(3, 5, 2 * d, device="cuda").to(dtype) * 3
    if act == "silu":
        got, want = elementwise.silu_and_mul(x), reference.silu_and_mul(x)
    else:
        got, want = elementwise.gelu_and_mul(x, act), reference.gelu_and_mul(x, act)
    assert got.shape == (3, 5, d)
    check(got, want, dtype)


# ---------------------------------------------------------------- dispatch through ops

def test_ops_dispatch_decode_to_cuda_and_match_reference(monkeypatch):
    seq_lens = [5, 300, 77]
    kc, vc, bt, _, _ = make_paged(seq_lens, 2, 64, 16, BF16, "cuda")
    q = torch.randn(3, 8, 64, device="cuda", dtype=BF16)
    calls = []
    real = attention_cuda.paged_attention_decode
    monkeypatch.setattr(attention_cuda, "paged_attention_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = ops.paged_attention(q, kc, vc, bt, seq_lens, [1, 1, 1], 0.125,
                              seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"))
    assert calls == [1]
    check(got, reference.paged_attention(q, kc, vc, bt, seq_lens, [1, 1, 1], 0.125), BF16)
    x = torch.randn(4, 512, device="cuda", dtype=BF16)
    w = torch.randn(256, device="cuda", dtype=BF16)
    check(ops.silu_and_mul(x), reference.silu_and_mul(x), BF16)
    check(ops.rms_norm(x[:, :256], w, 1e-6), reference.rms_norm(x[:, :256], w, 1e-6), BF16)
