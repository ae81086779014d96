"""The batched LoRA kernels (kernels/lora.py): the reference against a per-token loop; the Triton
shrink/expand (kernels/lora_triton.py) against the reference on the CPU under Triton's interpreter (a
child process started with TRITON_INTERPRET=1) and compiled for Hopper here, and on CUDA at the
8B model's shapes, eagerly and replayed from a CUDA graph whose token -> slot indices change in place
between replays."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from testkit.kernel_cases import set_kernel_options
from testkit.lora_cases import INTERPRETER_UNUSABLE, INTERPRETED, make_case, per_token, run_case

from pagedray.kernels.lora import lora_delta

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels need CUDA")
TESTS = pathlib.Path(__file__).resolve().parents[1]


def _order(idx: torch.Tensor) -> torch.Tensor:
    return torch.argsort(idx.cpu(), stable=True).to(torch.int32)


def test_reference_matches_a_per_token_loop():
    x, a, b, idx, order, y = make_case(37, 3, 8, 24, 40, torch.float32, "cpu")
    got = lora_delta(y.clone(), x, a, b, idx, order)
    torch.testing.assert_close(got, per_token(y, x, a, b, idx), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[idx < 0], y[idx < 0])   # rows without an adapter are untouched


# -- CPU: Triton's interpreter, and the kernels compiled for sm_90 -----------------------------------
def test_interpreted_cases_match_the_reference():
    """testkit.lora_cases.INTERPRETED in a child process started with TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "testkit.lora_cases"], env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode == INTERPRETER_UNUSABLE:   # (see testkit.prefill_flash_cases; the GPU tests run these compiled)
        pytest.skip(run.stdout.strip())
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert run.stdout.count("ok   ") == len(INTERPRETED), run.stdout


@pytest.mark.parametrize("kernel,consts,warps", [
    ("shrink", dict(SPLIT=True, BLOCK_T=16, BLOCK_R=64, BLOCK_K=128, RED=8), 4),   # decode, packed qkv
    ("shrink", dict(SPLIT=False, BLOCK_T=64, BLOCK_R=16, BLOCK_K=128, RED=1), 4),  # prefill
    ("expand", dict(BLOCK_T=64, BLOCK_N=128, BLOCK_R=32), 8),                      # decode batch 256, gate_up
    ("expand", dict(BLOCK_T=16, BLOCK_N=64, BLOCK_R=64), 4),                       # small batches
    ("expand", dict(BLOCK_T=32, BLOCK_N=128, BLOCK_R=64, GROUP_R=16), 4),          # packed qkv, its blocks of B
    ("shrink", dict(SPLIT=True, BLOCK_T=16, BLOCK_R=16, BLOCK_K=128, RED=8, PDL=True), 4),   # lora_pdl
    ("expand", dict(BLOCK_T=64, BLOCK_N=128, BLOCK_R=32, GROUP_R=16, PDL=True), 8),
])
def test_kernels_compile_for_hopper_on_tensor_cores_without_spills(kernel, consts, warps):
    """As launched on an H100 (Triton's bundled ptxas, no GPU): tensor-core products, no register spills;
    the split shrink takes its tile's ticket with a GPU-scope acquire-release atomic after a barrier; with
    PDL both wait for the kernel before them, and the shrink lets its expand launch."""
    pytest.importorskip("triton")
    from testkit.lora_cases import compile_for_hopper
    got = compile_for_hopper(kernel, num_warps=warps, **consts)
    assert got["mma"] > 0 and got["spill_bytes"] == 0 and got["smem"] <= 227 * 1024, {**got, "ptx": None}
    waits = {"griddepcontrol.wait": 1, "griddepcontrol.launch_dependents": int(kernel == "shrink")}
    assert {k: got["ptx"].count(k) for k in waits} == (waits if consts.get("PDL") else dict.fromkeys(waits, 0))
    if consts.get("SPLIT"):
        assert re.search(r"bar\.sync[^\n]*\n(?:[^\n]*\n){0,12}[^\n]*atom\.global\.gpu\.acq_rel\.add", got["ptx"])


@pytest.mark.parametrize("tokens", [1, 16, 64, 256, 1024, 8192])
@pytest.mark.parametrize("k,n,r", [(4096, 6144, 48), (4096, 4096, 16), (4096, 28672, 32), (14336, 4096, 16)])
def test_tiles_fill_an_h100_and_cover_k(tokens, k, n, r):
    """The 8B shapes on 132 SMs: the splits tile K exactly (none empty), the finishing program's sum stays
    bounded, no decode program streams more than 64 KB of x and one slot's A (the latency of a few loads),
    and the expand grid covers the SMs or uses the smallest tiles."""
    pytest.importorskip("triton")
    from pagedray.kernels import lora_triton as L
    s = L.shrink_config(tokens, k, r, 132, 8)
    assert s.k_per_split % s.block_k == 0 and (s.splits - 1) * s.k_per_split < k <= s.splits * s.k_per_split
    assert s.splits * min(tokens, s.block_t) * L._block_r(r) <= L._MAX_REDUCE or s.splits == 1
    if tokens <= 256:
        assert s.k_per_split * (r + min(tokens, s.block_t)) * 2 <= 64 * 1024, s
    e = L.expand_config(tokens, n, 132)
    programs = -(-tokens // e.block_t) * -(-n // e.block_n)
    assert programs >= 116 or (e.block_t, e.block_n) == (16, 32), e
    if tokens <= s.block_t:   # one tile over (up to) 8 slots: no program walks more than 3 of them in turn
        assert -(-min(tokens, 8) // s.slot_par) <= 3, s


def test_expand_refuses_slices_that_do_not_tile_b():
    pytest.importorskip("triton")
    from pagedray.kernels import lora_triton as L
    x, a, b, idx, order, y = make_case(4, 2, 48, 32, 96, torch.float32, "cpu")
    part = torch.zeros(1, 4, 48)
    for bad in [(32, 32), (32, 32, 16, 8, 8), (96, 0)]:   # not adding up to N; over 4 groups; an empty one
        with pytest.raises(ValueError, match="slices"):
            L.lora_expand(part, b, idx, order, y, bad)


# -- CUDA ---------------------------------------------------------------------------------------------
QKV, GATE_UP = (4096, 1024, 1024), (14336, 14336)
SHAPES = [(1, 1, 16, 4096, 48, None), (1, 8, 48, 4096, 6144, QKV), (7, 4, 48, 512, 6144, None),
          (16, 8, 32, 4096, 28672, GATE_UP), (64, 8, 8, 4096, 4100, None), (256, 8, 32, 4096, 28672, None),
          (256, 8, 48, 4096, 6144, QKV), (256, 8, 16, 14336, 4096, None), (33, 3, 64, 4096, 16, None),
          (100, 8, 16, 14336, 4096, None), (1030, 8, 64, 4096, 6144, (4000, 1072, 1072)),
          (2048, 8, 16, 14336, 4096, None)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,slots,rank,k,n,slices", SHAPES)
def test_triton_matches_reference(dtype, tokens, slots, rank, k, n, slices):
    run_case("cuda", tokens, slots, rank, k, n, dtype, slices=slices)
    if dtype == torch.bfloat16:   # and the layers' entry point
        x, a, b, idx, order, y = make_case(tokens, slots, rank, k, n, dtype, "cuda")
        rows = idx >= 0
        whole = lora_delta(y.clone(), x, a, b, idx, order)
        torch.testing.assert_close(whole.float()[rows], per_token(y, x, a, b, idx)[rows], atol=0.3, rtol=3e-2)


needs_hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                  reason="programmatic dependent launch needs Hopper or later")


@needs_hopper
@pytest.mark.parametrize("tokens,slots,rank,k,n,slices", [SHAPES[1], SHAPES[6], SHAPES[10]])
def test_triton_with_programmatic_dependent_launch_matches_reference(tokens, slots, rank, k, n, slices):
    run_case("cuda", tokens, slots, rank, k, n, torch.bfloat16, slices=slices, pdl=True)


@needs_cuda
@pytest.mark.parametrize("pdl", [False, pytest.param(True, marks=needs_hopper)])
@pytest.mark.parametrize("tokens,rank,k,n", [(1, 16, 4096, 28672), (8, 32, 4096, 2048), (64, 32, 4096, 2048),
                                             (256, 48, 4096, 6144), (700, 16, 14336, 4096)])
def test_triton_under_cuda_graph_follows_indices_changed_in_place(tokens, rank, k, n, pdl, monkeypatch):
    set_kernel_options(monkeypatch, lora_pdl=pdl)
    slots = 4
    x, a, b, idx, order, y = make_case(tokens, slots, rank, k, n, torch.bfloat16, "cuda")
    out = y.clone()
    lora_delta(out, x, a, b, idx, order)   # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora_delta(out, x, a, b, idx, order)
    for seed in range(3):
        new_idx = torch.randint(-1, slots, (tokens,), generator=torch.Generator().manual_seed(100 + seed),
                                dtype=torch.int32)
        idx.copy_(new_idx.cuda())
        order.copy_(_order(new_idx).cuda())
        out.copy_(y)
        for _ in range(2):   # (a replay leaves the shrink's counters as it found them)
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(out, lora_delta(y.clone(), x, a, b, idx, order), atol=0, rtol=0)
            out.copy_(y)
        graph.replay()
        rows = new_idx.cuda() >= 0
        torch.testing.assert_close(out[rows].float(), per_token(y, x, a, b, idx)[rows], atol=0.3, rtol=3e-2)
        assert torch.equal(out[~rows], y[~rows])
