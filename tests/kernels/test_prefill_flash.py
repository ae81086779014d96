"""The FlashAttention-style Triton prefill kernel (kernels/prefill_flash.py) against the reference.

On the CPU it runs under Triton's interpreter (in a child process started with TRITON_INTERPRET=1)
at small shapes and small tiles, so the split loop's unmasked and diagonal blocks and every feature
switch run here; on a GPU the cases run compiled at the real tile sizes, plus the routes to the old
kernel and through ops.paged_attention.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
from testkit.kernel_cases import make_paged, set_kernel_options
from testkit.prefill_flash_cases import FP16, FP32, INTERPRETER_UNUSABLE, run_case

from pagedray.kernels import reference

triton = pytest.importorskip("triton")
BF16 = torch.bfloat16
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TESTS = pathlib.Path(__file__).resolve().parents[1]


# -- CPU, Triton's interpreter -------------------------------------------------------------------
def test_interpreted_cases_match_the_reference():
    """testkit.prefill_flash_cases.INTERPRETED in a child process started with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "testkit.prefill_flash_cases"], env=env, capture_output=True,
                         text=True, timeout=500)
    if run.returncode == INTERPRETER_UNUSABLE:   # an environment without a working interpreter (Triton < 3.6 under
        pytest.skip(run.stdout.strip())            # NumPy >= 2.4); the GPU tests below run the same cases compiled
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert run.stdout.count("ok   ") == 12, run.stdout


@pytest.mark.parametrize("new_kv", [0, 2])
def test_compiles_for_hopper_with_wgmma_and_no_spills(new_kv):
    """The default tile compiled for sm_90 here (Triton's bundled ptxas, no GPU): tensor-core wgmma, TMA
    where NEW_KV=2 asks for it, no register spills, shared memory within an H100's 227 KiB."""
    from testkit.prefill_flash_cases import compile_for_hopper
    got = compile_for_hopper(new_kv=new_kv)
    assert got["wgmma"] > 0 and got["spill_bytes"] == 0 and got["smem"] <= 227 * 1024, got
    assert (got["tma"] > 0) == (new_kv == 2), got


def test_tiles_run_longest_first():
    from pagedray.kernels.prefill_flash import tiles
    seqs, rows = tiles([300, 20, 64], [300, 500, 64], 128)
    # sequence 1's one tile reads 500 keys, sequence 0's last tile 300, its first 128, sequence 2's 64.
    assert list(zip(seqs, rows)) == [(1, 0), (0, 256), (0, 128), (0, 0), (2, 0)]


def test_variant_checks_its_keys():
    from pagedray.kernels.prefill_flash import DEFAULT_VARIANT, variant
    assert variant(None, 4096) == DEFAULT_VARIANT
    assert variant(None, 40)["BLOCK_M"] == 64 and variant({"BLOCK_M": 128}, 40)["BLOCK_M"] == 128
    with pytest.raises(ValueError, match="BLOCK_N"):
        variant({"BLOCK_N": 48}, 4096)
    with pytest.raises(ValueError, match="among"):
        variant({"TILE": 1}, 4096)


# -- GPU, compiled ---------------------------------------------------------------------------------
GPU_CASES = [(1, 1), (37, 37), (300, 100), (513, 1), (64, 64), (129, 17), (1000, 1000), (700, 300)]


@gpu
@pytest.mark.parametrize("head_size,block_size", [(64, 16), (80, 32), (128, 16), (128, 8)])
def test_gpu_head_and_block_sizes(head_size, block_size):
    run_case("cuda", heads=8, kv_heads=2, head_size=head_size, block_size=block_size, cases=GPU_CASES)


@gpu
@pytest.mark.parametrize("variant", [{"BLOCK_N": 128}, {"SPLIT": 0}, {"BLOCK_M": 64, "NUM_WARPS": 4},
                                     {"NUM_STAGES": 2}])
def test_gpu_variants(variant):
    run_case("cuda", heads=32, kv_heads=8, head_size=128, cases=GPU_CASES, variant=variant)


@gpu
@pytest.mark.parametrize("window,alibi,cap,fp8", [(50, False, None, False), (33, True, 5.0, False),
                                                  (None, False, None, True)])
def test_gpu_window_alibi_softcap_fp8(window, alibi, cap, fp8):
    run_case("cuda", heads=8, kv_heads=2, head_size=128, cases=GPU_CASES, window=window, alibi=alibi, cap=cap,
             fp8=fp8)


@gpu
def test_gpu_fp16_and_the_routes_to_the_old_kernel(monkeypatch):
    """fp16 runs here; head size 256, decode-only rows and float32 (the exact path) go to prefill_triton."""
    from pagedray.kernels import prefill_triton
    run_case("cuda", dtype=FP16, heads=8, kv_heads=2, head_size=128, cases=GPU_CASES)
    calls = []
    real = prefill_triton.paged_prefill
    monkeypatch.setattr(prefill_triton, "paged_prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_case("cuda", heads=4, kv_heads=2, head_size=256, cases=GPU_CASES)
    run_case("cuda", heads=4, kv_heads=2, cases=[(5, 1), (900, 1)])
    run_case("cuda", dtype=FP32, heads=4, kv_heads=2, cases=GPU_CASES)
    assert calls == [1, 1, 1]


@gpu
@pytest.mark.parametrize("new_kv", [0, 1])
def test_gpu_ops_takes_the_flash_kernel_when_selected(monkeypatch, new_kv):
    """prefill_backend="triton_flash": a mixed step's decode rows to the decode kernel, the rest here,
    with the step's K/V rows after the decode rows."""
    from pagedray.kernels import ops, prefill_flash
    variant = {"BLOCK_N": 128, "NEW_KV": new_kv}
    set_kernel_options(monkeypatch, prefill_backend="triton_flash", prefill_variant=variant)
    assert ops.prefill_reads_step_kv(torch.empty(1, 8, 128, dtype=BF16, device="cuda")) == bool(new_kv)
    assert not ops.prefill_reads_step_kv(torch.empty(1, 8, 128, dtype=BF16))   # the CPU reference reads the cache
    calls = []
    real = prefill_flash.paged_prefill
    monkeypatch.setattr(prefill_flash, "paged_prefill", lambda q, *a, **k: calls.append(
        (q.shape[0], k["variant_overrides"], k["key"].shape[0])) or real(q, *a, **k))
    torch.manual_seed(3)
    seq_lens, query_lens = [700, 9, 300, 40, 513], [1, 1, 300, 17, 64]
    kc, vc, bt, keys, values = make_paged(seq_lens, 2, 128, 16, BF16, "cuda")
    fused = torch.randn(sum(query_lens), 12, 128, device="cuda").to(BF16)   # a fused QKV output
    q, key, value = fused[:, :8], fused[:, 8:10], fused[:, 10:]
    key[:] = torch.cat([k[s - n:] for k, s, n in zip(keys, seq_lens, query_lens)])
    value[:] = torch.cat([v[s - n:] for v, s, n in zip(values, seq_lens, query_lens)])
    got = ops.paged_attention(q, kc, vc, bt, seq_lens, query_lens, 0.125, key=key, value=value,
                              seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"))
    rows = sum(query_lens) - 2
    assert calls == [(rows, variant, rows)]
    want = reference.paged_attention(q, kc, vc, bt, seq_lens, query_lens, 0.125)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=1.6e-2)


@gpu
@pytest.mark.parametrize("variant", [{"NEW_KV": 1}, {"NEW_KV": 2}, {"NEW_KV": 2, "BLOCK_N": 128, "NUM_STAGES": 2}])
@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("own_key", [False, True], ids=["fused", "own_key"])
def test_gpu_new_kv_from_the_step_tensors(variant, window, own_key):
    run_case("cuda", heads=32, kv_heads=8, head_size=128, cases=GPU_CASES, variant=variant, window=window,
             own_key=own_key)
