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
             window=None, alibi=False, cap=None, fp8=False, variant=None, seed=7, own_key=False) -> None:
    """With variant NEW_KV the step's new K/V go in too, as strided slices of one fused QKV-like tensor
    (own_key: K a dense tensor of its own, as the rotary kernel writes it, V still the fused slice)."""
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
    if own_key:
        key = key.contiguous()
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
    dict(variant={**SMALL_TILES, "NEW_KV": 1}, own_key=True),
    dict(variant={**SMALL_TILES, "NEW_KV": 2}, own_key=True),
)]


INTERPRETER_UNUSABLE = 3   # main()'s exit code where this Triton's interpreter cannot run loops at all


def _interpreter_runs_loops() -> str | None:
    """None, or why this Triton's interpreter cannot run a loop with a runtime bound (Triton 3.5's calls
    int() on 1-element arrays, which NumPy >= 2.4 refuses; Triton 3.9's squeezes them first)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, n):
        total = 0
        for _ in range(0, n, 1):
            total += 1
        tl.store(out_ptr, total)
    out = torch.zeros(1, dtype=torch.int32)
    try:
        probe[(1,)](out, 3)
    except Exception as exc:  # the interpreter's own failure, whatever its type
        import numpy
        return f"Triton {triton.__version__}'s interpreter under NumPy {numpy.__version__}: {exc}"
    return None if int(out) == 3 else f"Triton {triton.__version__}'s interpreter counted {int(out)} of 3"


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before starting (Triton reads it at import)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    broken = _interpreter_runs_loops()
    if broken:
        print(f"interpreter unusable: {broken}", flush=True)
        return INTERPRETER_UNUSABLE
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


def compile_for_hopper(dtype: str = "bf16", head: int = 128, block_m: int = 128, block_n: int = 64, warps: int = 8,
                       stages: int = 3, new_kv: int = 0) -> dict:
    """prefill_flash's kernel compiled for sm_90 on this machine (no GPU: Triton's bundled ptxas), as the
    launcher would specialise it: {"regs", "spill_bytes", "smem", "wgmma", "tma"}."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagedray.kernels import prefill_flash
    fn = prefill_flash._flash_prefill_kernel
    consts = dict(HEAD_SIZE=head, HEAD_PAD=max(16, triton.next_power_of_2(head)), BLOCK_SIZE=16, BLOCK_M=block_m,
                  BLOCK_N=block_n, HAS_ALIBI=False, HAS_SOFTCAP=False, HAS_WINDOW=False, KV_FP8=False, OFFS64=False,
                  SPLIT=True, NEW_KV=new_kv)
    step_kv = f"tensordesc<{dtype}[{block_n}, {head}]>" if new_kv == 2 else f"*{dtype}"
    types = {"out_ptr": f"*{dtype}", "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}",
             "tables_ptr": "*i32", "meta_ptr": "*i32", "alibi_ptr": "*fp32", "kn": step_kv, "vn": step_kv,
             "qk_scale": "fp32", "scale": "fp32", "soft_cap": "fp32", "v_scale": "fp32"}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    aligned = {"q_stride_t", "o_stride_t", "kn_stride_t", "q_stride_h", "o_stride_h"}  # as specialised at run time
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if signature[n].startswith("*") or n in aligned}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups()
    ptx = kernel.asm["ptx"]
    return {"regs": int(regs), "spill_bytes": int(stack), "smem": kernel.metadata.shared,
            "wgmma": ptx.count("wgmma.mma_async"), "tma": ptx.count("cp.async.bulk.tensor")}
