"""Launchers of the row-wise kernels: RMSNorm (norm.cu), rotary and rotary fused with the KV-cache
write (rotary.cu), gated activations (activation.cu). Same results and return conventions as
`reference`; `out=` lets callers (and tests) provide the output buffers."""
from __future__ import annotations

import torch

from pagedray.kernels import _compile as C
from pagedray.kernels import cache_ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTS = {"silu": 0, "none": 1, "tanh": 2}
_empty = torch.empty  # tests swap this to poison freshly allocated outputs


def _rows(name: str, x: torch.Tensor, width: int) -> torch.Tensor:
    """x as a 2-D [rows, width] view (copying only if it cannot be viewed), dense rows."""
    x2 = x.reshape(-1, width)
    if x2.stride(1) != 1:
        raise ValueError(f"{name} must be dense in its last dimension, got strides {x.stride()}")
    return x2


def _check_out(name: str, out: torch.Tensor | None, like: torch.Tensor, shape: tuple[int, ...]) -> None:
    if out is None:
        return
    C.check_cuda(name, out, like.device)
    C.check_dtype(name, out, like.dtype)
    C.check_contiguous(name, out)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")


def _vec(width: int, *tensors: torch.Tensor) -> int:
    """Elements per access: 16 bytes when every row allows it, else 1."""
    vec = 16 // tensors[0].element_size()
    return vec if width % vec == 0 and C.aligned16(*tensors) else 1


def _norm(x, residual, weight, eps, out, residual_out):
    C.check_cuda("x", x)
    C.check_dtype("x", x, *DTYPES)
    hidden = x.shape[-1]
    C.check_cuda("weight", weight, x.device)
    C.check_dtype("weight", weight, x.dtype, torch.float32)
    C.check_shape("weight", weight, (hidden,))
    if residual is not None:
        C.check_cuda("residual", residual, x.device)
        C.check_dtype("residual", residual, x.dtype)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    _check_out("out", out, x, x.shape)
    _check_out("residual_out", residual_out, x, x.shape)
    out = _empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    if residual is not None and residual_out is None:
        residual_out = _empty(x.shape, dtype=x.dtype, device=x.device)
    x2 = _rows("x", x, hidden)
    r2 = _rows("residual", residual, hidden) if residual is not None else None
    rows = x2.shape[0]
    if rows == 0 or hidden == 0:
        return out, residual_out
    dense = [out.view(-1, hidden)] + ([residual_out.view(-1, hidden), r2] if residual is not None else [])
    vec = _vec(hidden, x2, *dense)
    chunks = hidden // vec
    # Two chunks per thread keeps the row in registers (the kernel holds up to 2, norm.cu: MAXC).
    half = -(-chunks // 2)
    threads = min(1024, max(32, -(-half // 32) * 32))
    dev = C.device_of(x)
    kernel = C.get_kernel("norm.cu", "rms_norm", dev, SCALAR_T=C.CTYPE[x.dtype],
                          WEIGHT_T=C.CTYPE[weight.dtype], VEC=vec)
    C.launch(kernel, (rows,), (threads,),
             (C.ptr(out), C.ptr(residual_out), C.ptr(x2), C.ptr(r2), C.ptr(weight), C.i64(x2.stride(0)),
              C.i64(r2.stride(0) if r2 is not None else 0), C.i32(hidden), C.f32(eps)), dev)
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., hidden] -> x * rsqrt(mean(x^2) + eps) * weight (float math), in x's dtype."""
    return _norm(x, None, weight, eps, out, None)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *,
                       out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the inputs are not modified unless passed as outputs."""
    return _norm(x, residual, weight, eps, out, residual_out)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool, *,
                     inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim channels of query [T, H, D] and key [T, Hkv, D].

    Returns new dense tensors (as the reference does), or query and key themselves when inplace.
    positions must index rows of cos_sin_cache (not checked on the device).
    """
    rot_dim = _check_rotary_inputs(positions, query, key, cos_sin_cache)
    dev = query.device
    num_tokens, num_heads, head_size = query.shape
    if inplace:
        q_out, k_out = query, key
    else:
        q_out = _empty(query.shape, dtype=query.dtype, device=dev)
        k_out = _empty(key.shape, dtype=key.dtype, device=dev)
    if num_tokens == 0:
        return q_out, k_out
    dev = C.device_of(query)
    kernel = C.get_kernel("rotary.cu", "rotary_embedding", dev, SCALAR_T=C.CTYPE[query.dtype],
                          COS_T=C.CTYPE[cos_sin_cache.dtype])
    work = (num_heads + key.shape[1]) * rot_dim // 2
    C.launch(kernel, (num_tokens,), (min(512, max(32, -(-work // 32) * 32)),),
             (C.ptr(q_out), C.ptr(k_out), C.ptr(query), C.ptr(key), C.ptr(positions), C.ptr(cos_sin_cache),
              C.i64(query.stride(0)), C.i64(key.stride(0)), C.i64(q_out.stride(0)), C.i64(k_out.stride(0)),
              C.i32(num_heads), C.i32(key.shape[1]), C.i32(head_size), C.i32(rot_dim), C.i32(int(is_neox)),
              C.i32(int(not inplace and rot_dim < head_size))), dev)
    return q_out, k_out


def _rotary_pack(rot_dim: int, head_size: int, *tensors: torch.Tensor) -> int:
    """Elements per access of rotary_and_cache: 16 bytes' worth when each unit of them stays inside
    the rotary half, the rest or the head, and every base and row stride is 16-byte aligned; else 1."""
    pack = 16 // tensors[0].element_size()
    fits = (rot_dim // 2) % pack == 0 and head_size % pack == 0
    return pack if fits and C.aligned16(*tensors) else 1


def rotary_embedding_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, cos_sin_cache: torch.Tensor, is_neox: bool,
                               key_cache: torch.Tensor, value_cache: torch.Tensor,
                               slot_mapping: torch.Tensor) -> torch.Tensor:
    """rotary_embedding, then cache_ops.reshape_and_cache of the rotated key and value, in one launch.

    Returns the rotated query as a new dense [T, H, D] tensor; the rotated key exists only in
    key_cache (the attention that follows reads K from there). Inputs are left unchanged.
    """
    rot_dim = _check_rotary_inputs(positions, query, key, cos_sin_cache)
    cache_ops.check_cache_args(key, value, key_cache, value_cache, slot_mapping)
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads = key.shape[1]
    q_out = _empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return q_out
    pack = _rotary_pack(rot_dim, head_size, query, key, value, q_out, key_cache, value_cache, cos_sin_cache)
    # One thread per unit (see rotary.cu): rotary pairs and unrotated rest of q and k, then v.
    units = ((num_heads + num_kv_heads) * (rot_dim // 2 + head_size - rot_dim) + num_kv_heads * head_size) // pack
    threads = min(256, -(-units // 32) * 32)
    dev = C.device_of(query)
    kernel = C.get_kernel("rotary.cu", "rotary_and_cache", dev, SCALAR_T=C.CTYPE[query.dtype],
                          COS_T=C.CTYPE[cos_sin_cache.dtype], PACK=pack)
    C.launch(kernel, (num_tokens, -(-units // threads)), (threads,),
             (C.ptr(q_out), C.ptr(key_cache), C.ptr(value_cache), C.ptr(query), C.ptr(key), C.ptr(value),
              C.ptr(positions), C.ptr(slot_mapping), C.ptr(cos_sin_cache), C.i64(query.stride(0)),
              C.i64(key.stride(0)), C.i64(value.stride(0)), C.i32(num_heads), C.i32(num_kv_heads),
              C.i32(head_size), C.i32(rot_dim), C.i32(key_cache.shape[2]), C.i32(int(is_neox))), dev)
    return q_out


def _check_rotary_inputs(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                         cos_sin_cache: torch.Tensor) -> int:
    """The checks rotary_embedding and rotary_embedding_and_cache share; returns rotary_dim."""
    C.check_cuda("query", query)
    dev = query.device
    C.check_dtype("query", query, *DTYPES)
    for name, t in (("query", query), ("key", key)):
        C.check_cuda(name, t, dev)
        C.check_dim(name, t, 3)
        C.check_rows(name, t)
    C.check_dtype("key", key, query.dtype)
    num_tokens, _, head_size = query.shape
    if key.shape[0] != num_tokens or key.shape[2] != head_size:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query {tuple(query.shape)}")
    C.check_cuda("positions", positions, dev)
    C.check_dtype("positions", positions, torch.int64)
    C.check_shape("positions", positions, (num_tokens,))
    C.check_cuda("cos_sin_cache", cos_sin_cache, dev)
    C.check_dtype("cos_sin_cache", cos_sin_cache, torch.float32, query.dtype)
    C.check_dim("cos_sin_cache", cos_sin_cache, 2)
    C.check_contiguous("cos_sin_cache", cos_sin_cache)
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim % 2 or rot_dim > head_size or rot_dim == 0:
        raise ValueError(f"cos_sin_cache width (rotary_dim) must be even and in [2, {head_size}], got {rot_dim}")
    return rot_dim


def _act_and_mul(x: torch.Tensor, act: str, out: torch.Tensor | None) -> torch.Tensor:
    C.check_cuda("x", x)
    C.check_dtype("x", x, *DTYPES)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"x last dimension must be even (gate and up halves), got shape {tuple(x.shape)}")
    d = x.shape[-1] // 2
    shape = tuple(x.shape[:-1]) + (d,)
    _check_out("out", out, x, shape)
    out = _empty(shape, dtype=x.dtype, device=x.device) if out is None else out
    x2 = _rows("x", x, 2 * d)
    rows = x2.shape[0]
    if rows == 0 or d == 0:
        return out
    o2 = out.view(-1, d)
    vec = _vec(d, x2, o2)
    threads = min(256, max(32, -(-(d // vec) // 32) * 32))
    dev = C.device_of(x)
    kernel = C.get_kernel("activation.cu", "act_and_mul", dev, SCALAR_T=C.CTYPE[x.dtype], VEC=vec,
                          ACT=_ACTS[act])
    C.launch(kernel, (rows, -(-(d // vec) // threads), 1), (threads,),
             (C.ptr(o2), C.ptr(x2), C.i64(x2.stride(0)), C.i32(d)), dev)
    return out


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:]."""
    return _act_and_mul(x, "silu", out)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none", *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu(x[..., :d], approximate) * x[..., d:]; approximate is "none" or "tanh"."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return _act_and_mul(x, approximate, out)
