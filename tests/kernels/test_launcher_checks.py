"""Launchers reject bad arguments with a ValueError naming the argument, before any launch."""
from __future__ import annotations

import pytest
import torch
from testkit.kernel_cases import set_kernel_options

from pagedray.kernels import attention_cuda, cache_ops, cuda_available, elementwise

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_available()),
                                reason="needs a CUDA device and CuPy")


def _decode_args(device, dtype=torch.bfloat16, heads=8, kv_heads=2, head_size=128, block_size=16):
    q = torch.randn(3, heads, head_size, device=device).to(dtype)
    kc = torch.randn(10, kv_heads, block_size, head_size, device=device).to(dtype)
    bt = torch.arange(12, dtype=torch.int32, device=device).reshape(3, 4) % 10
    sl = torch.tensor([5, 17, 40], dtype=torch.int32, device=device)
    return dict(query=q, key_cache=kc, value_cache=kc.clone(), block_tables=bt, seq_lens=sl, scale=0.1,
                max_seq_len=40)


def test_cpu_tensors_are_rejected_with_the_argument_name():
    with pytest.raises(ValueError, match="query must be on a CUDA device"):
        attention_cuda.paged_attention_decode(**_decode_args("cpu"))
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="x must be on a CUDA device"):
        elementwise.rms_norm(x, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="x must be on a CUDA device"):
        elementwise.silu_and_mul(x)
    with pytest.raises(ValueError, match="query must be on a CUDA device"):
        elementwise.rotary_embedding(torch.arange(4), x.view(4, 1, 8), x.view(4, 1, 8), torch.ones(16, 8), True)
    with pytest.raises(ValueError, match="key must be on a CUDA device"):
        cache_ops.reshape_and_cache(x.view(4, 1, 8), x.view(4, 1, 8), x, x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="kv_caches must hold"):
        cache_ops.copy_blocks([], [(0, 1)])
    with pytest.raises(ValueError, match="query must be on a CUDA device"):
        elementwise.rotary_embedding_and_cache(**_rotary_cache_args("cpu"))


@needs_cuda
@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(query=a["query"].double()), "query must have dtype"),
    (lambda a: a.update(key_cache=a["key_cache"].half()), "key_cache must have dtype"),
    (lambda a: a.update(key_cache=a["key_cache"][:, :, :, :64].contiguous()), "key_cache head size"),
    (lambda a: a.update(value_cache=a["value_cache"][:5]), "value_cache shape"),
    (lambda a: a.update(key_cache=a["key_cache"].transpose(1, 2)), "key_cache must be contiguous"),
    (lambda a: a.update(query=a["query"][:, :7]), "query heads"),
    (lambda a: a.update(block_tables=a["block_tables"].long()), "block_tables must have dtype"),
    (lambda a: a.update(block_tables=a["block_tables"][:2]), "block_tables has 2 rows"),
    (lambda a: a.update(max_seq_len=100), "block_tables .* cannot hold max_seq_len 100"),
    (lambda a: a.update(seq_lens=a["seq_lens"][:2]), "seq_lens must be a contiguous"),
    (lambda a: a.update(alibi_slopes=torch.ones(3, device="cuda")), "alibi_slopes must be a contiguous"),
    (lambda a: a.update(sliding_window=0), "sliding_window must be positive"),
    (lambda a: a.update(out=torch.empty(1, device="cuda")), "out must have dtype|out shape"),
    (lambda a: a.update(partition_size=100), "partition_size must be"),
])
def test_decode_launcher_rejects(change, match):
    args = _decode_args("cuda")
    change(args)
    with pytest.raises(ValueError, match=match):
        attention_cuda.paged_attention_decode(**args)


@needs_cuda
def test_decode_launcher_rejects_unsupported_block_and_head_sizes():
    with pytest.raises(ValueError, match="block size must be one of"):
        attention_cuda.paged_attention_decode(**_decode_args("cuda", block_size=4))
    with pytest.raises(ValueError, match="head size must be a multiple of 8 and at most 256"):
        attention_cuda.paged_attention_decode(**_decode_args("cuda", head_size=512))


@needs_cuda
def test_elementwise_and_cache_launchers_reject():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        elementwise.rms_norm(x, torch.ones(32, device="cuda"), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        elementwise.fused_add_rms_norm(x, x[:2], torch.ones(64, device="cuda"), 1e-6)
    with pytest.raises(ValueError, match="x last dimension must be even"):
        elementwise.silu_and_mul(x[:, :63])
    with pytest.raises(ValueError, match="approximate must be"):
        elementwise.gelu_and_mul(x, "fast")
    q = x.view(4, 4, 16)
    with pytest.raises(ValueError, match="positions must have dtype"):
        elementwise.rotary_embedding(torch.arange(4, device="cuda", dtype=torch.int32), q, q,
                                     torch.ones(8, 16, device="cuda"), True)
    with pytest.raises(ValueError, match="rotary_dim"):
        elementwise.rotary_embedding(torch.arange(4, device="cuda"), q, q, torch.ones(8, 18, device="cuda"), True)
    kc = torch.zeros(4, 4, 8, 16, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="slot_mapping must have dtype"):
        cache_ops.reshape_and_cache(q, q, kc, kc, torch.zeros(4, device="cuda", dtype=torch.int32))
    with pytest.raises(ValueError, match="key_cache must have dtype"):
        cache_ops.reshape_and_cache(q, q, kc.float(), kc.float(), torch.zeros(4, device="cuda", dtype=torch.long))
    caches = [torch.zeros(2, 4, 2, 8, 16, device="cuda") for _ in range(2)]
    with pytest.raises(ValueError, match=r"src_to_dst pair \(0, 4\) outside"):
        cache_ops.copy_blocks(caches, [(0, 4)])
    with pytest.raises(ValueError, match=r"kv_caches\[1\] is"):
        cache_ops.copy_blocks([caches[0], caches[1][:, :3].contiguous()], [(0, 1)])


def _rotary_cache_args(device="cuda"):
    kv = torch.randn(4, 2, 16, device=device, dtype=torch.bfloat16)
    kc = torch.zeros(3, 2, 8, 16, device=device, dtype=torch.bfloat16)
    return dict(positions=torch.arange(4, device=device), query=torch.randn(4, 4, 16, device=device).bfloat16(),
                key=kv, value=kv.clone(), cos_sin_cache=torch.ones(8, 16, device=device), is_neox=True,
                key_cache=kc, value_cache=kc.clone(), slot_mapping=torch.arange(4, device=device))


@needs_cuda
@pytest.mark.parametrize("change,match", [
    (lambda a: a.update(positions=a["positions"].int()), "positions must have dtype"),
    (lambda a: a.update(cos_sin_cache=torch.ones(8, 18, device="cuda")), "rotary_dim"),
    (lambda a: a.update(key=a["key"][:, :, :8].contiguous()), "key shape"),
    (lambda a: a.update(value=a["value"][:, :1]), "value shape"),
    (lambda a: a.update(key_cache=a["key_cache"].float()), "key_cache must have dtype"),
    (lambda a: a.update(value_cache=a["value_cache"][:2]), "value_cache shape"),
    (lambda a: a.update(key_cache=a["key_cache"].transpose(1, 2)), "key_cache must be contiguous"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"].int()), "slot_mapping must have dtype"),
    (lambda a: a.update(slot_mapping=a["slot_mapping"][:3]), "slot_mapping must be a contiguous"),
])
def test_rotary_and_cache_launcher_rejects(change, match):
    args = _rotary_cache_args()
    change(args)
    with pytest.raises(ValueError, match=match):
        elementwise.rotary_embedding_and_cache(**args)


@pytest.mark.parametrize("many, few, warps, prefetch", [(False, False, 4, 1), (True, False, 2, 0), (False, True, 8, 0)])
def test_decode_variant_by_grid_size(monkeypatch, many, few, warps, prefetch):
    set_kernel_options(monkeypatch, attention_variant={})
    chosen = attention_cuda.variant(4, many, few)
    assert (chosen["NUM_WARPS"], chosen["PREFETCH"]) == (warps, prefetch)
    assert "FP8_HALF2" not in chosen and attention_cuda.variant(4, many, few, fp8=True)["FP8_HALF2"] == 1
    set_kernel_options(monkeypatch, attention_variant={"NUM_WARPS": 1})
    assert attention_cuda.variant(4, many, few)["NUM_WARPS"] == 1   # a fixed entry wins

