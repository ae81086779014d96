"""Launcher of the decode paged-attention kernel (paged_attention.cu).

One query token per sequence. Short contexts run in one pass (one CTA per
sequence and group of query heads sharing a KV head); long ones in two
(partitions of PARTITION_SIZE tokens, then a reduce kernel).

CUDA graphs: the grid depends only on the host-side `max_seq_len` and the
shapes, never on the device `seq_lens`; CTAs past a sequence's own length
exit at once. A graph captured with `max_seq_len` at its largest value
therefore replays correctly for any shorter lengths.
"""
from __future__ import annotations

import torch

from pagedray.kernels import CUDA_BLOCK_SIZES
from pagedray.kernels import _compile as C
from pagedray.kernels.options import current as options

PARTITION_SIZE = 512
NUM_WARPS = 4
BLOCK_SIZES = CUDA_BLOCK_SIZES
MAX_HEAD_SIZE = 256
MAX_HEADS_PER_CTA = 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_CACHE = torch.float8_e4m3fn                       # kv_cache_dtype="fp8"
FP8_QUERY_DTYPES = (torch.float16, torch.bfloat16)    # the query dtypes an FP8 cache serves
# Compile-time variants of paged_attention.cu (see there): SCORE_XPOSE, the transposed score
# reduction; PREFETCH, loading tile n+1 while tile n is computed; TPG_MAX, rows per lane group
# per tile; NUM_WARPS per CTA. An entry not fixed by KernelOptions.attention_variant takes the
# measured default of `variant`; tests and benchmarks fix entries to run the others.
# A one-pass grid of at least this many CTAs per SM (large decode batches) takes the variant with
# fewer registers (2 warps, no prefetch, 4 rows per tile): more CTAs stay resident, which is what
# short and medium contexts need; smaller grids keep the deeper pipeline (benchmarks/attention_sweep.py).
# With an FP8 cache that grid still prefetches (H100, batch 1024, context 384: 351 against 413 µs).
# FP8_HALF2 (an FP8 cache only): the products in half2 (paged_attention.cu says why).
# A one-pass grid with fewer CTAs than SMs (batch 1 to a few) takes 8 warps and no prefetch: each
# CTA's context is then shared by more warps (H200, batch 1, 32/8 heads: 4.8 against 6.2 µs at
# context 64, 12.3 against 15.7 at 512).
MANY_CTAS_PER_SM = 6


def variant(hpb: int, many_ctas: bool = False, few_ctas: bool = False, fp8: bool = False) -> dict[str, int]:
    """The -D constants of paged_attention.cu: the attention_variant option's entries, else the measured defaults."""
    default = {"SCORE_XPOSE": 1, "PREFETCH": int(hpb >= 2), "NUM_WARPS": NUM_WARPS, "TPG_MAX": None,
               "FP8_HALF2": 1 if fp8 else None}
    if many_ctas:
        default.update(PREFETCH=int(fp8), NUM_WARPS=2, TPG_MAX=4)
    elif few_ctas:
        default.update(PREFETCH=0, NUM_WARPS=8)
    chosen = {}
    for name, value in default.items():
        fixed = options().attention_variant.get(name)
        value = value if fixed is None else fixed
        if value is not None:
            chosen[name] = value
    return chosen

_empty = torch.empty  # tests swap this to poison the output and split-mode scratch buffers


def heads_per_cta(group: int) -> int:
    """Largest divisor of the GQA group size (query heads per KV head) up to 8."""
    return max(h for h in range(1, MAX_HEADS_PER_CTA + 1) if group % h == 0)


def use_split(num_ctas: int, max_seq_len: int, num_sms: int) -> bool:
    """Two passes when one pass would leave SMs idle or give each CTA a very long context."""
    if max_seq_len <= PARTITION_SIZE:
        return False
    return num_ctas < 2 * num_sms or max_seq_len > 8192


def _check(query, key_cache, value_cache, block_tables, seq_lens, alibi_slopes, out, max_seq_len,
           sliding_window, logits_soft_cap) -> None:
    C.check_cuda("query", query)
    dev = query.device
    C.check_dtype("query", query, *DTYPES)
    C.check_dim("query", query, 3)
    C.check_rows("query", query)
    num_seqs, num_heads, head_size = query.shape
    vec = 16 // query.element_size()
    if head_size % vec or head_size > MAX_HEAD_SIZE:
        raise ValueError(f"query head size must be a multiple of {vec} and at most {MAX_HEAD_SIZE}, "
                         f"got {head_size}")
    if not C.aligned16(query):
        raise ValueError("query must be 16-byte aligned (base address and row stride)")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        C.check_cuda(name, cache, dev)
        C.check_dtype(name, cache, query.dtype, *((FP8_CACHE,) if query.dtype in FP8_QUERY_DTYPES else ()))
        C.check_dim(name, cache, 4)
        C.check_contiguous(name, cache)
        if cache.shape[3] != head_size:
            raise ValueError(f"{name} head size {cache.shape[3]} != query head size {head_size}")
        if cache.shape[2] not in BLOCK_SIZES:
            raise ValueError(f"{name} block size must be one of {BLOCK_SIZES}, got {cache.shape[2]}")
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache shape {tuple(value_cache.shape)} != key_cache shape "
                         f"{tuple(key_cache.shape)}")
    num_kv_heads = key_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key_cache heads ({num_kv_heads})")
    C.check_cuda("block_tables", block_tables, dev)
    C.check_dtype("block_tables", block_tables, torch.int32)
    C.check_dim("block_tables", block_tables, 2)
    C.check_contiguous("block_tables", block_tables)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    if block_tables.shape[1] * key_cache.shape[2] < max_seq_len:
        raise ValueError(f"block_tables ({block_tables.shape[1]} blocks of {key_cache.shape[2]}) "
                         f"cannot hold max_seq_len {max_seq_len}")
    C.check_cuda("seq_lens", seq_lens, dev)
    C.check_dtype("seq_lens", seq_lens, torch.int32)
    C.check_shape("seq_lens", seq_lens, (num_seqs,))
    if alibi_slopes is not None:
        C.check_cuda("alibi_slopes", alibi_slopes, dev)
        C.check_dtype("alibi_slopes", alibi_slopes, torch.float32)
        C.check_shape("alibi_slopes", alibi_slopes, (num_heads,))
    if out is not None:
        C.check_cuda("out", out, dev)
        C.check_dtype("out", out, query.dtype)
        C.check_contiguous("out", out)
        if out.shape != query.shape:
            raise ValueError(f"out shape {tuple(out.shape)} != query shape {tuple(query.shape)}")
    if max_seq_len < 0:
        raise ValueError(f"max_seq_len must be >= 0, got {max_seq_len}")
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
    if logits_soft_cap is not None and logits_soft_cap < 0:
        raise ValueError(f"logits_soft_cap must be positive or None, got {logits_soft_cap}")


def paged_attention_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                           max_seq_len: int, sliding_window: int | None = None,
                           alibi_slopes: torch.Tensor | None = None,
                           logits_soft_cap: float | None = None, out: torch.Tensor | None = None,
                           partition_size: int | None = None, k_scale: float = 1.0,
                           v_scale: float = 1.0) -> torch.Tensor:
    """Decode attention: query [S, H, D] (one token per sequence) -> [S, H, D].

    seq_lens: int32 [S] on the device, each <= max_seq_len (a host-side bound
    that sizes the split grid). partition_size: None picks one- or two-pass
    by `use_split`; 0 forces one pass; a multiple of 32 forces two passes.
    A sequence of length 0 yields zeros. An FP8 (e4m3) cache with 16-bit queries holds
    K / k_scale and V / v_scale (kv_cache_dtype="fp8"); other caches ignore the scales.
    """
    _check(query, key_cache, value_cache, block_tables, seq_lens, alibi_slopes, out, max_seq_len,
           sliding_window, logits_soft_cap)
    num_seqs, num_heads, head_size = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    out = _empty(query.shape, dtype=query.dtype, device=query.device) if out is None else out
    if num_seqs == 0:
        return out
    dev = C.device_of(query)
    hpb = heads_per_cta(num_heads // num_kv_heads)
    grid_x = num_heads // hpb
    if partition_size is None:
        split = use_split(grid_x * num_seqs, max_seq_len, C.num_sms(dev))
        partition_size = PARTITION_SIZE if split else 0
    if partition_size and (partition_size % 32 or partition_size <= 0):
        raise ValueError(f"partition_size must be a positive multiple of 32 or 0, got {partition_size}")
    ctas, num_sms = grid_x * num_seqs, C.num_sms(dev)
    many_ctas = not partition_size and ctas >= MANY_CTAS_PER_SM * num_sms
    few_ctas = not partition_size and ctas < num_sms
    fp8 = key_cache.dtype == FP8_CACHE
    if not fp8:
        k_scale, v_scale = 1.0, 1.0
    defines = dict(SCALAR_T=C.CTYPE[query.dtype], HEAD_SIZE=head_size, BLOCK_SIZE=block_size, HPB=hpb,
                   **variant(hpb, many_ctas, few_ctas, fp8), **({"CACHE_FP8": 1} if fp8 else {}))
    kernel = C.get_kernel("paged_attention.cu", "paged_decode", dev, **defines)
    max_parts = max(1, -(-max_seq_len // partition_size)) if partition_size else 1
    common = (C.ptr(query), C.ptr(key_cache), C.ptr(value_cache), C.ptr(block_tables), C.ptr(seq_lens),
              C.ptr(alibi_slopes), C.i32(num_kv_heads), C.i32(num_heads // num_kv_heads),
              C.i64(query.stride(0)), C.i32(block_tables.stride(0)), C.f32(scale * k_scale),
              C.f32(logits_soft_cap or 0.0), C.i32(sliding_window or 0), C.i32(partition_size),
              C.i32(max_parts), C.f32(v_scale))
    block = (defines["NUM_WARPS"] * 32,)
    if not partition_size:
        C.launch(kernel, (grid_x, num_seqs, 1), block, (C.ptr(out), C.ptr(None), C.ptr(None), C.ptr(None))
                 + common, dev)
        return out
    part_out = _empty((num_seqs, num_heads, max_parts, head_size), dtype=torch.float32, device=dev)
    part_m = _empty((num_seqs, num_heads, max_parts), dtype=torch.float32, device=dev)
    part_l = _empty((num_seqs, num_heads, max_parts), dtype=torch.float32, device=dev)
    C.launch(kernel, (grid_x, num_seqs, max_parts), block,
             (C.ptr(out), C.ptr(part_out), C.ptr(part_m), C.ptr(part_l)) + common, dev)
    reduce = C.get_kernel("paged_attention.cu", "paged_decode_reduce", dev, **defines)
    C.launch(reduce, (num_heads, num_seqs, 1), (128,),
             (C.ptr(out), C.ptr(part_out), C.ptr(part_m), C.ptr(part_l), C.ptr(seq_lens),
              C.i32(partition_size), C.i32(max_parts)), dev, shared_mem=4 * max_parts)
    return out
