"""FP8 kernels against their PyTorch references (kernels/fp8.py), on fresh random inputs.

The launchers' argument checks run everywhere (they precede any device work); the kernels need a
CUDA GPU with FP8 tensor cores (sm_89+) and CuPy.
"""
from __future__ import annotations

import pytest
import torch
from testkit.kernel_cases import set_kernel_options

from pagedray.kernels import cuda_available
from pagedray.kernels import fp8 as F8
from pagedray.kernels import fp8_cuda

needs_fp8_gpu = pytest.mark.skipif(not (cuda_available() and F8.has_fp8_tensor_cores()),
                                   reason="needs a CUDA GPU with FP8 tensor cores (sm_89+) and CuPy")


def _weight(n: int, k: int, block_k: int | None, device="cuda", seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    if block_k is None:
        wq, scale = F8.quantize_weight_per_channel(w)
    else:
        kb = -(-k // block_k)
        scale = torch.rand(n, kb, generator=gen) * 1e-3 + 1e-4
        wq = F8.to_fp8(w / scale.repeat_interleave(block_k, 1)[:, :k])
    return wq.to(device), scale.contiguous().to(device)


def test_launcher_checks_name_the_argument():
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    wq, scale = _weight(32, 64, None, device="cpu")
    with pytest.raises(ValueError, match="weight must have dtype"):
        fp8_cuda.skinny_gemm_fp8(x, wq.float(), scale)
    with pytest.raises(ValueError, match="x must have dtype"):
        fp8_cuda.skinny_gemm_fp8(x.float(), wq, scale)
    with pytest.raises(ValueError, match="at most 8 rows"):
        fp8_cuda.skinny_gemm_fp8(torch.zeros(9, 64, dtype=torch.bfloat16), wq, scale)
    with pytest.raises(ValueError, match="scale must be"):
        fp8_cuda.skinny_gemm_fp8(x, wq, scale[:5])
    with pytest.raises(ValueError, match="input_scale must hold one value"):
        fp8_cuda.quantize_per_token(x, torch.ones(2))
    with pytest.raises(ValueError, match="must be on a CUDA device"):
        fp8_cuda.skinny_gemm_fp8(x, wq, scale)


def test_reference_dequantizes_then_multiplies():
    """CPU: the reference equals the float32 product of the dequantized operands, and per-channel
    quantization round-trips within e4m3's half-ulp (2^-4 relative)."""
    x = torch.randn(5, 64)
    wq, scale = _weight(32, 64, None, device="cpu")
    xq, xs = F8.quantize_per_token_ref(x)
    torch.testing.assert_close(F8.fp8_linear_ref(x, wq, scale), (xq.float() * xs) @ F8.dequantize(wq, scale).T)
    assert ((xq.float() * xs - x).abs() <= x.abs().amax(-1, keepdim=True) / 448 * 16 + 1e-6).all()


@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_k", [None, 128])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_skinny_gemm_fp8_matches_reference(dtype, block_k, m):
    n, k = 1000, 4096 + 128   # n not a multiple of any variant's rows; k a partial last step
    wq, scale = _weight(n, k, block_k, seed=m)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    # Every variant at one token in bf16 (what benchmarks/fp8.py sweeps); the default elsewhere.
    for variant in [None, *fp8_cuda.SWEEP] if (m, dtype) == (1, torch.bfloat16) else [None]:
        got = fp8_cuda.skinny_gemm_fp8(x, wq, scale, bias, variant=variant)
        ref = F8.fp8_weight_only_ref(x, wq, scale, bias)
        torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2 * ref.abs().max().item())


@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_per_token_is_bit_exact(dtype, static):
    x = torch.randn(37, 4104, device="cuda", dtype=dtype) * 3
    x[5] = 0  # an all-zero row keeps a finite scale
    x[7, 11] = 1e4 if dtype == torch.bfloat16 else 6e4
    input_scale = torch.tensor([0.01], device="cuda") if static else None
    xq, xs = fp8_cuda.quantize_per_token(x, input_scale)
    rq, rs = F8.quantize_per_token_ref(x) if not static else F8.quantize_static_ref(x, input_scale)
    assert torch.equal(xs, rs)
    assert torch.equal(xq.view(torch.uint8), rq.view(torch.uint8))


@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [5, 64, 1000])
def test_scaled_mm_matches_reference(dtype, m):
    n, k = 3072, 4096
    wq, scale = _weight(n, k, None, seed=m)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    got = fp8_cuda.scaled_mm(x, wq, scale, bias)
    ref = F8.fp8_linear_ref(x, wq, scale, bias)
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=1e-2 * ref.abs().max().item())
    static = torch.tensor([x.abs().max().item() / 448], device="cuda")
    ref = F8.fp8_linear_ref(x, wq, scale, None, static)
    torch.testing.assert_close(fp8_cuda.scaled_mm(x, wq, scale, None, static).float(), ref.float(), rtol=2e-2,
                               atol=1e-2 * ref.abs().max().item())


@needs_fp8_gpu
def test_fp8_paths_replay_in_a_cuda_graph():
    wq, scale = _weight(512, 1024, None)
    xs = {m: torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16) for m in (1, 16)}
    eager = {m: F8.fp8_linear(x, wq, scale) for m, x in xs.items()}
    graph, outs = torch.cuda.CUDAGraph(), {}
    with torch.cuda.graph(graph):
        for m, x in xs.items():
            outs[m] = F8.fp8_linear(x, wq, scale)
    for x in xs.values():
        x.mul_(2)  # new inputs in place: the replay must see them
    graph.replay()
    for m in xs:
        torch.testing.assert_close(outs[m], eager[m] * 2, rtol=2e-2, atol=1e-2 * eager[m].abs().max().item())


# --- FP8 KV cache (kv_cache_dtype="fp8"): the CUDA write, decode and prefill kernels against the
# reference on CPU (e4m3 values with per-tensor scales).

def _fp8_cache_case(dtype, seq_lens, query_lens, heads=8, kv_heads=2, d=128, bs=16, seed=0):
    from testkit.tiny_models import allocate_block_tables
    gen = torch.Generator().manual_seed(seed)
    tables = allocate_block_tables(seq_lens, bs)
    width = max(map(len, tables))
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    nblocks = 1 + sum(map(len, tables))
    total = sum(seq_lens)
    k = torch.randn(total, kv_heads, d, generator=gen).to(dtype)
    v = torch.randn(total, kv_heads, d, generator=gen).to(dtype)
    slots = torch.tensor([tables[i][p // bs] * bs + p % bs for i, n in enumerate(seq_lens) for p in range(n)])
    q = torch.randn(sum(query_lens), heads, d, generator=gen).to(dtype)
    return k, v, slots, q, table_t, (nblocks, kv_heads, bs, d)


@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_cache_write_is_bit_exact(dtype):
    from pagedray.kernels import reference
    k, v, slots, _, _, shape = _fp8_cache_case(dtype, [37, 5], [1, 1])
    slots[3] = -1  # graph padding: nothing written
    kc, vc = torch.zeros(shape, dtype=torch.float8_e4m3fn), torch.zeros(shape, dtype=torch.float8_e4m3fn)
    gk, gv = kc.cuda(), vc.cuda()
    reference.reshape_and_cache(k, v, kc, vc, slots, 0.02, 0.5)
    fp8_cuda.reshape_and_cache_fp8(k.cuda(), v.cuda(), gk, gv, slots.cuda(), 0.02, 0.5)
    assert torch.equal(gk.cpu().view(torch.uint8), kc.view(torch.uint8))
    assert torch.equal(gv.cpu().view(torch.uint8), vc.view(torch.uint8))


@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seq_lens", [[1, 17, 300], [2000, 64]])   # one pass; split contexts
@pytest.mark.parametrize("half2", [0, 1])                          # products in float / in half2
def test_fp8_cache_decode_matches_reference(monkeypatch, dtype, seq_lens, half2):
    from pagedray.kernels import attention_cuda, reference
    set_kernel_options(monkeypatch, attention_variant={"FP8_HALF2": half2})
    k, v, slots, q, table, shape = _fp8_cache_case(dtype, seq_lens, [1] * len(seq_lens))
    kc, vc = torch.zeros(shape, dtype=torch.float8_e4m3fn), torch.zeros(shape, dtype=torch.float8_e4m3fn)
    reference.reshape_and_cache(k, v, kc, vc, slots, 0.02, 0.01)
    want = reference.paged_attention(q, kc, vc, table, seq_lens, [1] * len(seq_lens), 0.088, k_scale=0.02,
                                     v_scale=0.01)
    got = attention_cuda.paged_attention_decode(
        q.cuda(), kc.cuda(), vc.cuda(), table.cuda(), torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        0.088, max_seq_len=max(seq_lens), k_scale=0.02, v_scale=0.01)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=2e-2, atol=2e-3)


@needs_fp8_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_cache_prefill_matches_reference(dtype):
    from pagedray.kernels import prefill_triton, reference
    seq_lens, query_lens = [40, 130, 7], [40, 30, 1]
    k, v, slots, q, table, shape = _fp8_cache_case(dtype, seq_lens, query_lens)
    kc, vc = torch.zeros(shape, dtype=torch.float8_e4m3fn), torch.zeros(shape, dtype=torch.float8_e4m3fn)
    reference.reshape_and_cache(k, v, kc, vc, slots, 0.02, 0.01)
    want = reference.paged_attention(q, kc, vc, table, seq_lens, query_lens, 0.088, k_scale=0.02, v_scale=0.01)
    got = prefill_triton.paged_prefill(q.cuda(), kc.cuda(), vc.cuda(), table.cuda(), seq_lens, query_lens, 0.088,
                                       k_scale=0.02, v_scale=0.01)
    # The kernel rounds the softmax weights to the model dtype for the tensor-core P·V product, as the
    # bf16 cache's prefill does (tests/kernels/test_prefill_triton.py's tolerances): ~1 bf16 ulp.
    atol, rtol = (2e-2, 1.6e-2) if dtype == torch.bfloat16 else (2e-3, 2e-2)
    torch.testing.assert_close(got.cpu().float(), want.float(), rtol=rtol, atol=atol)
