"""Cases of the FlashAttention-style prefill kernel (kernels/prefill_flash.py) against the reference.

`run_case` builds one paged batch and compares the kernel with `reference.paged_attention`.
`python -m testkit.prefill_flash_cases` runs the CPU set under Triton's interpreter: the
interpreter must be on before `triton` is first imported (Triton's own library functions are
decorated at import), so the tests run it in a child process with TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import sys

import torch

from testkit.kernel_cases import alibi_slopes, make_paged

BF16, FP16 = torch.bfloat16, torch.float16
FP32 = torch.float32
TOL = {BF16: (2e-2, 1.6e-2, 1e-2), FP16: (2e-3, 2e-3, 2e-3), FP32: (1e-4, 1e-4, 1e-5)}
# (context length, new query tokens): whole prompts, a chunk after a cached prefix, a prefix-cache
# hit, a decode row inside a mixed batch; the longest query is over 16 rows, so the launch is this kernel's.
CPU_CASES = [(70, 70), (150, 50), (61, 17), (40, 1)]
# Tiles small enough for the interpreter and for several unmasked and diagonal blocks per tile.
SMALL_TILES = {"BLOCK_M": 32, "BLOCK_N": 16, "NUM_WARPS": 4, "NUM_STAGES": 1}


def run_case(device: str, dtype=BF16, heads=4, kv_heads=2, head_size=64, block_size=16, cases=CPU_CASES,
             window=None, alibi=False, cap=None, fp8=False, variant=None, seed=7) -> None:
    """With variant NEW_KV the step's new K/V go in too, as strided slices of one fused QKV-like tensor."""
    from pagedray.kernels import prefill_flash, reference
    torch.manual_seed(seed)
    seq_lens, query_lens = [c for c, _ in cases], [q for _, q in cases]
    kc, vc, bt, keys, values = make_paged(seq_lens, kv_heads, head_size, block_size, dtype, device)
    width = kv_heads * head_size
    fused = torch.full((sum(query_lens), (heads + 2 * kv_heads) * head_size), float("nan"), dtype=dtype, device=device)
    key = fused[:, heads * head_size:heads * head_size + width].view(-1, kv_heads, head_size)
    value = fused[:, heads * head_size + width:].view(-1, kv_heads, head_size)
    key[:], value[:] = (torch.cat([x[c - q:] for x, (c, q) in zip(keys, cases)]),
                        torch.cat([x[c - q:] for x, (c, q) in zip(values, cases)]))
    scales = (1.0, 1.0)
    if fp8:  # the cache holds K / k_scale and V / v_scale in e4m3 (the NaN slots stay NaN)
        scales = (0.5, 2.0)
        kc, vc = (kc.float() / scales[0]).to(torch.float8_e4m3fn), (vc.float() / scales[1]).to(torch.float8_e4m3fn)
    q = torch.randn(sum(query_lens), heads, head_size, device=device).to(dtype)
    slopes = alibi_slopes(heads).to(device) if alibi else None
    out = torch.full_like(q, float("nan"))
    got = prefill_flash.paged_prefill(q, kc, vc, bt, seq_lens, query_lens, head_size ** -0.5, window, slopes, cap,
                                      out=out, k_scale=scales[0], v_scale=scales[1], variant_overrides=variant,
                                      key=key, value=value)
    want = reference.paged_attention(q, kc, vc, bt, seq_lens, query_lens, head_size ** -0.5, window, slopes, cap,
                                     *scales)
    atol, rtol, rel = TOL[dtype]
    assert not got.isnan().any(), "NaN in the kernel's output"
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    err = ((got.double() - want.double()).norm() / want.double().norm()).item()
    assert err < rel, f"relative error {err:.2e} >= {rel}"


# The interpreted set: both loops with several blocks each, a head size that is not a power of two,
# block size 8, the plain (unsplit) loop, sliding window, ALiBi + soft-cap, an FP8 cache, MHA, the new
# K/V read from the step's tensors (by pointers; by TMA descriptors, which the interpreter emulates). In
# float16: the interpreter's bfloat16 tl.dot is wrong (Triton 3.9, NumPy 2.4: it multiplies the raw
# 16-bit patterns); bfloat16 runs compiled in the GPU tests.
INTERPRETED = [{"dtype": FP16, "variant": SMALL_TILES, **case} for case in (
    dict(head_size=64, block_size=16),
    dict(head_size=80, block_size=8),
    dict(head_size=64, block_size=16, variant={**SMALL_TILES, "SPLIT": 0}),
    dict(window=20),
    dict(alibi=True, cap=5.0),
    dict(fp8=True),
    dict(heads=2, kv_heads=2, block_size=32),
    dict(variant={**SMALL_TILES, "NEW_KV": 1}),
    dict(head_size=80, variant={**SMALL_TILES, "NEW_KV": 1}, window=20, alibi=True),
    dict(variant={**SMALL_TILES, "NEW_KV": 2}, cap=5.0),
)]


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before starting (Triton reads it at import)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    failed = 0
    for case in INTERPRETED:
        try:
            run_case("cpu", **case)
            print(f"ok   {case}", flush=True)
        except Exception as exc:  # report every case, then fail
            failed += 1
            print(f"FAIL {case}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
