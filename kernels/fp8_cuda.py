"""Launchers of the FP8 kernels: the FP8-weight skinny GEMM (gemv_fp8.cu), the fused per-token
activation quantization (fp8_quant.cu), and the cuBLASLt FP8 GEMM through `torch._scaled_mm`.

References (kernels/fp8.py): `fp8_weight_only_ref` for the skinny GEMM, `quantize_per_token_ref` /
`quantize_static_ref` for the quantization, `fp8_linear_ref` for `scaled_mm`. Each launcher checks
dtypes, shapes and devices first (ValueError naming the argument); the only allocations are the
outputs, so every path is CUDA-graph capturable.
"""
from __future__ import annotations

import torch

from pagedray.kernels import _compile as C
from pagedray.kernels.fp8 import FP8_DTYPE, check_fp8_supported

MAX_M = 8
DTYPES = (torch.float16, torch.bfloat16)
KEYS = ("ROWS", "WARPS", "UNROLL")
# What benchmarks/fp8.py sweeps; DEFAULTS is the variant each token count runs.
SWEEP: list[dict[str, int]] = [{"ROWS": r, "WARPS": w, "UNROLL": u}
                               for r, w, u in ((1, 4, 8), (2, 4, 4), (2, 4, 8), (4, 4, 4), (2, 8, 4), (1, 8, 8))]
DEFAULTS: dict[int, dict[str, int]] = {m: {"ROWS": 2, "WARPS": 4, "UNROLL": 4} for m in range(1, MAX_M + 1)}


def _check_weight(wq: torch.Tensor, scale: torch.Tensor, k: int) -> int:
    """Checks Wq [N, K] e4m3 and its scale ([N] or [N, Kb] float32); returns the scales' k-block (0: per row)."""
    C.check_dtype("weight", wq, FP8_DTYPE)
    C.check_dim("weight", wq, 2)
    C.check_contiguous("weight", wq)
    n = wq.shape[0]
    if wq.shape[1] != k:
        raise ValueError(f"weight shape {tuple(wq.shape)} needs {k} columns to match x")
    if k % 16:
        raise ValueError(f"K must be a multiple of 16 for FP8, got {k}")
    C.check_dtype("scale", scale, torch.float32)
    C.check_contiguous("scale", scale)
    if scale.dim() == 1 and scale.shape[0] == n:
        return 0
    if scale.dim() == 2 and scale.shape[0] == n and scale.shape[1] >= 1:
        block_k = -(-k // scale.shape[1])
        if block_k % 16 or -(-k // block_k) != scale.shape[1]:
            raise ValueError(f"scale [N, Kb] needs k-blocks of a multiple of 16 columns, got {scale.shape[1]} "
                             f"blocks for K={k}")
        return block_k
    raise ValueError(f"scale must be [N]={n} or [N, Kb] float32, got shape {tuple(scale.shape)}")


def _check_x(x: torch.Tensor, max_m: int | None = None) -> None:
    C.check_dtype("x", x, *DTYPES)
    C.check_dim("x", x, 2)
    C.check_contiguous("x", x)
    if max_m is not None and x.shape[0] > max_m:
        raise ValueError(f"x must have at most {max_m} rows (tokens), got {x.shape[0]}")
    if x.data_ptr() % 16:
        raise ValueError("x must be 16-byte aligned")


def _check_devices(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    C.check_cuda("x", x)
    for name, t in others.items():
        if t is not None:
            C.check_cuda(name, t, x.device)
    check_fp8_supported(x.device)


def skinny_gemm_fp8(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                    out: torch.Tensor | None = None, *, variant: dict[str, int] | None = None) -> torch.Tensor:
    """x [M <= 8, K] (16-bit) · dequant(Wq [N, K] e4m3, scale)^T (+ bias [N]) -> [M, N] in x's dtype."""
    _check_x(x, MAX_M)
    m, k = x.shape
    block_k = _check_weight(wq, scale, k)
    n = wq.shape[0]
    if bias is not None:
        C.check_dtype("bias", bias, x.dtype)
        C.check_shape("bias", bias, (n,))
    if out is not None:
        C.check_dtype("out", out, x.dtype)
        C.check_shape("out", out, (m, n))
    if variant is not None and (set(variant) != set(KEYS) or not all(isinstance(v, int) and v >= 1
                                                                      for v in variant.values())):
        raise ValueError(f"variant must map exactly {KEYS} to positive ints, got {variant}")
    _check_devices(x, weight=wq, scale=scale, bias=bias, out=out)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    if m == 0 or n == 0:
        return out
    v = DEFAULTS[m] if variant is None else variant
    dev = C.device_of(x)
    kernel = C.get_kernel("gemv_fp8.cu", "skinny_gemm_fp8", dev, SCALAR_T=C.CTYPE[x.dtype], TOKENS=m,
                          ROWS=v["ROWS"], WARPS=v["WARPS"], UNROLL=v["UNROLL"], BLOCK_K=block_k)
    warps = -(-n // v["ROWS"])
    C.launch(kernel, (-(-warps // v["WARPS"]),), (v["WARPS"] * 32,),
             (C.ptr(out), C.ptr(x), C.ptr(wq), C.ptr(scale), C.ptr(bias), C.i32(n), C.i32(k),
              C.i32(scale.shape[1] if scale.dim() == 2 else 1)), dev)
    return out


def quantize_per_token(x: torch.Tensor, input_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (16-bit) -> (xq [M, K] e4m3, scale [M, 1] float32): dynamic per token, or static with
    a calibrated input_scale [1] (or []) float32."""
    _check_x(x)
    m, k = x.shape
    if k % 8:
        raise ValueError(f"K must be a multiple of 8, got {k}")
    if input_scale is not None:
        C.check_dtype("input_scale", input_scale, torch.float32)
        if input_scale.numel() != 1:
            raise ValueError(f"input_scale must hold one value, got shape {tuple(input_scale.shape)}")
    _check_devices(x, input_scale=input_scale)
    xq = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m == 0:
        return xq, scale
    dev = C.device_of(x)
    kernel = C.get_kernel("fp8_quant.cu", "quantize_fp8_per_token", dev, SCALAR_T=C.CTYPE[x.dtype],
                          STATIC=int(input_scale is not None))
    threads = min(1024, max(32, -(-(k // 8) // 32) * 32))
    C.launch(kernel, (m,), (threads,), (C.ptr(xq), C.ptr(scale), C.ptr(x), C.ptr(input_scale),
                                        C.i64(x.stride(0)), C.i32(k)), dev)
    return xq, scale


def scaled_mm(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8: quantize x per token (one kernel), then cuBLASLt's FP8 GEMM with row-wise scales
    (x's per token, W's per output channel) -> [M, N] in x's dtype."""
    _check_x(x)
    k = x.shape[1]
    if _check_weight(wq, scale, k):
        raise ValueError("scaled_mm takes per-channel scales [N]; block scales run the reference product")
    n = wq.shape[0]
    if n % 16:
        raise ValueError(f"N must be a multiple of 16 for cuBLASLt FP8, got {n}")
    xq, xs = quantize_per_token(x, input_scale)
    # Row-wise scaling writes bf16 (cuBLASLt's supported output for it); bias is added in that dtype.
    y = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=scale.view(1, n), out_dtype=torch.bfloat16,
                         bias=None if bias is None else bias.to(torch.bfloat16))
    return y if x.dtype == torch.bfloat16 else y.to(x.dtype)


def reshape_and_cache_fp8(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                          v_scale: float = 1.0) -> None:
    """Write 16-bit key/value [T, Hkv, D] into e4m3 caches [NB, Hkv, BS, D] as x / scale (slot -1 skips).
    Its reference: `reference.reshape_and_cache` with the same scales."""
    for name, t in (("key", key), ("value", value)):
        C.check_dtype(name, t, *DTYPES)
        C.check_dim(name, t, 3)
        C.check_rows(name, t)
    if value.shape != key.shape or value.dtype != key.dtype:
        raise ValueError(f"value {tuple(value.shape)} {value.dtype} != key {tuple(key.shape)} {key.dtype}")
    num_tokens, num_kv_heads, head_size = key.shape
    if head_size % 8:
        raise ValueError(f"head size must be a multiple of 8 for an FP8 cache, got {head_size}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        C.check_dtype(name, cache, FP8_DTYPE)
        C.check_dim(name, cache, 4)
        C.check_contiguous(name, cache)
        if cache.shape[1] != num_kv_heads or cache.shape[3] != head_size or cache.shape != key_cache.shape:
            raise ValueError(f"{name} shape {tuple(cache.shape)} does not match key heads/size "
                             f"({num_kv_heads}, {head_size})")
    C.check_dtype("slot_mapping", slot_mapping, torch.int64)
    C.check_shape("slot_mapping", slot_mapping, (num_tokens,))
    if not (k_scale > 0 and v_scale > 0):
        raise ValueError(f"k_scale and v_scale must be positive, got {k_scale}, {v_scale}")
    if not C.aligned16(key, value):
        raise ValueError("key and value must be 16-byte aligned (base address and row stride)")
    _check_devices(key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    if num_tokens == 0:
        return
    dev = C.device_of(key)
    kernel = C.get_kernel("cache_fp8.cu", "reshape_and_cache_fp8", dev, SCALAR_T=C.CTYPE[key.dtype])
    threads = min(256, max(32, -(-num_kv_heads * head_size // 8 // 32) * 32))
    C.launch(kernel, (num_tokens,), (threads,),
             (C.ptr(key), C.ptr(value), C.ptr(key_cache), C.ptr(value_cache), C.ptr(slot_mapping),
              C.i64(key.stride(0)), C.i64(value.stride(0)), C.i32(num_kv_heads), C.i32(head_size),
              C.i32(key_cache.shape[2]), C.f32(k_scale), C.f32(v_scale)), dev)
