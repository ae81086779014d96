"""Cases of the batched LoRA Triton kernels (kernels/lora_triton.py) against the PyTorch reference.

`run_case` builds one batch (tokens spread over `slots` adapters and none, sorted by slot as the
model runner sorts them) and checks the shrink, the expand and the pair against the reference, that
rows without an adapter stay untouched, and that a second launch on twice the input gives exactly twice
the sums (the shrink's arrival counters are back at zero, its sums do not depend on which program
finished last).
`python -m testkit.lora_cases` runs INTERPRETED on the CPU under Triton's interpreter (it must be on
before `triton` is first imported, so the tests start it in a child process with TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os
import sys

import torch

FP16, FP32 = torch.float16, torch.float32
TOL = {FP32: 1e-4, FP16: 3e-3, torch.bfloat16: 3e-2}


def make_case(tokens: int, slots: int, rank: int, k: int, n: int, dtype, device, seed: int = 0):
    """x, A, B, indices, order, y; about one token in (slots + 1) without an adapter."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(device, dtype)
    a = (torch.randn(slots, rank, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = (torch.randn(slots, n, rank, generator=gen) / rank ** 0.5).to(device, dtype)
    idx = torch.randint(-1, slots, (tokens,), generator=gen, dtype=torch.int32)
    order = torch.argsort(idx, stable=True).to(torch.int32)
    return x, a, b, idx.to(device), order.to(device), torch.randn(tokens, n, generator=gen).to(device, dtype)


def block_diagonal(slices, rank: int) -> torch.Tensor:
    """[N, R] 0/1: output group g's rows over B's columns g * R / groups onwards."""
    mask = torch.zeros(sum(slices), rank)
    share = rank // len(slices)
    for g, (start, size) in enumerate(zip([sum(slices[:i]) for i in range(len(slices))], slices)):
        mask[start:start + size, g * share:(g + 1) * share] = 1
    return mask


def per_token(y, x, a, b, idx) -> torch.Tensor:
    out = y.float().clone()
    for t, s in enumerate(idx.tolist()):
        if s >= 0:
            out[t] += (x[t].float() @ a[s].float().t()) @ b[s].float().t()
    return out


def run_case(device: str, tokens: int, slots: int, rank: int, k: int, n: int, dtype=FP16, shrink=None, expand=None,
             seed: int = 0, slices=None, pdl: bool = False) -> None:
    """`shrink`/`expand`: dicts of ShrinkConfig/ExpandConfig fields overriding the launchers' choice;
    `slices`: a packed layer's groups, passed to the expand with a dense B whose off-block entries the
    kernel must not read (the reference gets B with them zeroed, as a packed layer's B is); `pdl`: both
    kernels launched with programmatic dependent launch."""
    from pagedray.kernels import lora_triton as L
    from pagedray.kernels.lora import lora_expand_reference, lora_shrink_reference
    x, a, b_in, idx, order, y = make_case(tokens, slots, rank, k, n, dtype, device, seed)
    b = b_in * block_diagonal(slices, rank).to(device, dtype) if slices else b_in
    s_cfg = L.ShrinkConfig(**{**vars(L.shrink_config(tokens, k, rank, L._sms(x), slots)), **shrink}) if shrink else None
    e_cfg = L.ExpandConfig(**{**vars(L.expand_config(tokens, n, L._sms(x))), **expand}) if expand else None
    rows = idx >= 0
    tol = TOL[dtype]
    ref = lora_shrink_reference(x, a, idx)
    got = L.lora_shrink(x, a, idx, order, config=s_cfg, pdl=pdl)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    torch.testing.assert_close(got[0][rows], ref[0][rows], atol=tol, rtol=tol)
    # A second launch (the counters must be back at zero) on 2x: exactly twice the sums, whichever program
    # finished last (a fresh input, so that a stale buffer cannot pass for a result).
    again = L.lora_shrink(2 * x, a, idx, order, config=s_cfg, pdl=pdl)
    assert torch.equal(again[0][rows], 2 * got[0][rows]), "a second launch summed differently"
    out = L.lora_expand(ref, b_in, idx, order, y.clone(), slices, config=e_cfg, pdl=pdl)
    want = lora_expand_reference(ref, b, idx, y.clone())
    torch.testing.assert_close(out.float(), want.float(), atol=5 * tol, rtol=tol)
    assert torch.equal(out[~rows], y[~rows]), "a row without an adapter changed"
    whole = L.lora_expand(got, b_in, idx, order, y.clone(), slices, config=e_cfg, pdl=pdl)
    torch.testing.assert_close(whole.float()[rows], per_token(y, x, a, b, idx)[rows], atol=10 * tol, rtol=tol)
    assert torch.equal(whole[~rows], y[~rows]), "a row without an adapter changed"


# The interpreted set: a single token, a few, a full decode batch and a prefill over tiles of 64, with
# ranks 8/16/64 and a packed 3r = 48 (also with its block-diagonal B), N not a multiple of any block; K
# split into several programs whose last one adds the partials (also several partials per load, and an
# unsplit K); a tile's slots spread over several programs; in float16 and float32
# (the interpreter's bfloat16 tl.dot multiplies the raw 16-bit patterns: bfloat16 runs on the GPU).
INTERPRETED = [
    dict(tokens=1, slots=1, rank=16, k=512, n=48),
    dict(tokens=7, slots=4, rank=48, k=384, n=200),
    dict(tokens=64, slots=8, rank=8, k=256, n=96, dtype=FP32),
    dict(tokens=256, slots=8, rank=16, k=256, n=136),
    dict(tokens=1030, slots=3, rank=64, k=128, n=40),
    dict(tokens=40, slots=3, rank=16, k=512, n=130, shrink=dict(block_k=32, splits=16, k_per_split=32, red=4)),
    dict(tokens=40, slots=3, rank=16, k=512, n=130, shrink=dict(splits=1, k_per_split=512),
         expand=dict(block_t=32, block_n=64)),
    # a tile's slots over several programs (16 tokens over 8 adapters), with and without K splits
    dict(tokens=16, slots=8, rank=16, k=256, n=64, shrink=dict(splits=2, k_per_split=128, slot_par=3)),
    dict(tokens=16, slots=8, rank=8, k=256, n=64, dtype=FP32, shrink=dict(splits=1, k_per_split=256, slot_par=4)),
    dict(tokens=33, slots=2, rank=48, k=96, n=70, dtype=FP32, expand=dict(block_t=64, block_n=32)),
    # packed layers' block-diagonal B (groups straddling blocks; qkv-like 3, gate_up-like 2, 4)
    dict(tokens=20, slots=3, rank=48, k=128, n=112, slices=(64, 24, 24), expand=dict(block_n=32)),
    dict(tokens=9, slots=2, rank=32, k=128, n=100, dtype=FP32, slices=(50, 50)),
    dict(tokens=5, slots=2, rank=32, k=64, n=41, slices=(10, 11, 10, 10), expand=dict(block_n=16)),
]


INTERPRETER_UNUSABLE = 3   # main()'s exit code where this Triton's interpreter cannot run at all


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 before starting (Triton reads it at import)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    from testkit.prefill_flash_cases import _interpreter_runs_loops
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


def compile_for_hopper(kernel: str, dtype: str = "bf16", num_warps: int = 4, num_stages: int = 2, **consts) -> dict:
    """One of lora_triton's kernels ("shrink"/"expand") compiled for sm_90 on this machine (no GPU:
    Triton's bundled ptxas), pointers and strides as specialised at run time:
    {"regs", "spill_bytes", "smem", "mma" (mma.sync + wgmma), "ptx"}."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pagedray.kernels import lora_triton as L
    fn = L._shrink_kernel if kernel == "shrink" else L._expand_kernel
    types = {"x_ptr": f"*{dtype}", "a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "idx_ptr": "*i32",
             "order_ptr": "*i32", "part_ptr": "*fp32", "out_ptr": "*fp32", "p_ptr": "*fp32", "count_ptr": "*i32"}
    consts = {"IEEE": dtype == "fp32", "PDL": False, **({"GROUP_R": 0} if kernel == "expand" else {}), **consts}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    aligned = {n for n in fn.arg_names if "stride" in n or n in ("K", "N", "k_per_split")}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if signature[n].startswith("*") or n in aligned}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups()
    ptx = compiled.asm["ptx"]
    return {"regs": int(regs), "spill_bytes": int(stack), "smem": compiled.metadata.shared,
            "mma": ptx.count("mma.sync") + ptx.count("wgmma.mma_async"), "ptx": ptx}


if __name__ == "__main__":
    sys.exit(main())
