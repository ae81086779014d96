"""Launcher of the skinny GEMM (gemv.cu): y = x · W^T (+ bias) for decode's few tokens.

x [M, K] with M <= MAX_M (one compiled variant per M), W an nn.Linear weight [N, K].
Its reference is F.linear in float32 (`reference.linear`). The only allocation is
`out` when not given, so the launch is CUDA-graph capturable.
"""
from __future__ import annotations

import torch

from pagedray.kernels import _compile as C

MAX_M = 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Compile-time variants. MMA 0: gemv.cu (CUDA cores), ROWS output rows per warp; MMA 1:
# gemv_mma.cu (tensor cores, 16-bit types only), 16 rows per CTA whose warps split K, ROWS unused.
# Both: WARPS warps per CTA, UNROLL loop steps whose loads are in flight together, LOAD the W
# loads' cache hint.
MMA_ROWS, MAX_ROWS = 16, 8  # rows per tensor-core tile; most rows per warp on CUDA cores
KEYS = ("MMA", "ROWS", "WARPS", "UNROLL", "LOAD")
_LIMITS = {"MMA": (0, 1), "WARPS": (1, 32), "UNROLL": (1, 16), "LOAD": (0, 2)}
_empty = torch.empty  # tests swap this to poison freshly allocated outputs


def _v(rows: int, unroll: int, warps: int = 4, load: int = 0, mma: int = 0) -> dict[str, int]:
    return {"MMA": mma, "ROWS": rows, "WARPS": warps, "UNROLL": unroll, "LOAD": load}


def _mma(warps: int, unroll: int, load: int = 0) -> dict[str, int]:
    return _v(MMA_ROWS, unroll, warps, load, mma=1)


# What benchmarks/gemv.py sweeps and tests/kernels/test_gemv.py checks. CUDA cores: one row per
# warp with 8 or 16 loads in flight per lane and CTAs of 2, 4 or 8 warps (the fastest at one
# token), 2 and 4 rows per warp (more tokens reuse each W chunk), cache hints 0 and 1 (2 was
# never ahead). Tensor cores: 2 to 8 warps splitting K, 2 x UNROLL W loads per lane.
SWEEP: list[dict[str, int]] = [
    _v(1, 8), _v(1, 8, load=1), _v(1, 16), _v(1, 16, load=1), _v(1, 8, warps=8), _v(1, 8, warps=2),
    _v(2, 4), _v(2, 4, load=1), _v(2, 8, load=1), _v(4, 2), _v(4, 4, load=1),
    _mma(4, 8), _mma(8, 2), _mma(2, 8), _mma(4, 16), _mma(4, 8, load=1),
]
# The variant each token count runs by default: the best summed over one decode step's products
# in benchmarks/gemv.py (H200, llama3-8b). Edit to measure others.
DEFAULTS: dict[int, dict[str, int]] = {1: _v(1, 8), 2: _v(2, 4, load=1), 3: _v(4, 4, load=1),
                                       4: _v(4, 4, load=1), **{m: _mma(8, 2) for m in range(5, MAX_M + 1)}}
_FP32_DEFAULT = _v(4, 4, load=1)  # float32 has no tensor-core variant


def default_variant(m: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    variant = DEFAULTS[m]
    return _FP32_DEFAULT if variant["MMA"] and dtype == torch.float32 else variant


def name_of(variant: dict[str, int]) -> str:
    """Short name of a variant, e.g. R2W4U4L0 (CUDA cores) or MMA-W8U4L0 (tensor cores)."""
    rows = "MMA-" if variant["MMA"] else f"R{variant['ROWS']}"
    return f"{rows}W{variant['WARPS']}U{variant['UNROLL']}L{variant['LOAD']}"


def _check_variant(variant: dict[str, int]) -> None:
    if set(variant) != set(KEYS):
        raise ValueError(f"variant must have exactly the keys {KEYS}, got {sorted(variant)}")
    for key, (lo, hi) in _LIMITS.items():
        if not isinstance(variant[key], int) or not lo <= variant[key] <= hi:
            raise ValueError(f"variant {key} must be an int in [{lo}, {hi}], got {variant[key]!r}")
    rows = variant["ROWS"]
    if not isinstance(rows, int) or not (rows == MMA_ROWS if variant["MMA"] else 1 <= rows <= MAX_ROWS):
        rule = f"{MMA_ROWS} with MMA 1 (one tensor-core tile)" if variant["MMA"] else f"in [1, {MAX_ROWS}] with MMA 0"
        raise ValueError(f"variant ROWS must be {rule}, got {rows!r}")


def rows_aligned(x: torch.Tensor) -> bool:
    """x [M, K]'s rows start at 16-byte boundaries (its row stride matters only with M > 1)."""
    row_bytes = x.stride(0) * x.element_size()
    return x.data_ptr() % 16 == 0 and (x.shape[0] <= 1 or row_bytes % 16 == 0)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           out: torch.Tensor | None) -> None:
    """Shapes, dtypes and layouts first (they need no GPU), then devices."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("out", out)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    C.check_dtype("x", x, *DTYPES)
    C.check_dim("x", x, 2)
    if x.shape[1] > 1 and x.stride(1) != 1:  # C.check_rows indexes row 0, which M = 0 lacks
        raise ValueError(f"x must be dense past its first dimension, got strides {x.stride()}")
    m, k = x.shape
    if m > MAX_M:
        raise ValueError(f"x must have at most {MAX_M} rows (tokens), got {m}")
    C.check_dtype("weight", weight, x.dtype)
    C.check_dim("weight", weight, 2)
    C.check_contiguous("weight", weight)
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight shape {tuple(weight.shape)} needs {k} columns to match x {tuple(x.shape)}")
    vec = 16 // x.element_size()
    if k % vec:
        raise ValueError(f"K (x.shape[1]) must be a multiple of {vec} for {x.dtype}, got {k}")
    if not rows_aligned(x):
        raise ValueError("x must be 16-byte aligned (base address and row stride)")
    if not C.aligned16(weight):
        raise ValueError("weight must be 16-byte aligned (base address)")
    if bias is not None:
        C.check_dtype("bias", bias, x.dtype)
        C.check_shape("bias", bias, (n,))
    if out is not None:
        C.check_dtype("out", out, x.dtype)
        C.check_contiguous("out", out)
        if out.shape != (m, n):
            raise ValueError(f"out must have shape {(m, n)}, got {tuple(out.shape)}")
    C.check_cuda("x", x)
    for name, t in (("weight", weight), ("bias", bias), ("out", out)):
        if t is not None:
            C.check_cuda(name, t, x.device)


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                out: torch.Tensor | None = None, *, variant: dict[str, int] | None = None) -> torch.Tensor:
    """x [M, K] · weight [N, K]^T (+ bias [N]) -> [M, N] in x's dtype, float32 accumulation.

    x may be row-strided (dense rows 16-byte aligned); weight, bias and out dense.
    variant: the kernels' compile-time constants (KEYS); None takes `default_variant`.
    """
    if variant is not None:
        _check_variant(variant)
        if variant["MMA"] and isinstance(x, torch.Tensor) and x.dtype == torch.float32:
            raise ValueError("variant MMA 1 (tensor cores) needs float16 or bfloat16 x, got torch.float32")
    _check(x, weight, bias, out)
    m, k = x.shape
    n = weight.shape[0]
    out = _empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    if m == 0 or n == 0:
        return out
    variant = default_variant(m, x.dtype) if variant is None else variant
    dev = C.device_of(x)
    consts = dict(SCALAR_T=C.CTYPE[x.dtype], TOKENS=m, WARPS=variant["WARPS"], UNROLL=variant["UNROLL"],
                  LOAD=variant["LOAD"])
    if variant["MMA"]:
        kernel = C.get_kernel("gemv_mma.cu", "skinny_gemm_mma", dev, **consts)
        grid = (-(-n // MMA_ROWS),)
    else:
        kernel = C.get_kernel("gemv.cu", "skinny_gemm", dev, ROWS=variant["ROWS"], **consts)
        warps = -(-n // variant["ROWS"])
        grid = (-(-warps // variant["WARPS"]),)
    C.launch(kernel, grid, (variant["WARPS"] * 32,),
             (C.ptr(out), C.ptr(x), C.ptr(weight), C.ptr(bias), C.i64(x.stride(0)), C.i32(n), C.i32(k)), dev)
    return out
