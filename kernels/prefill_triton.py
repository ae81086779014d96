"""Paged prefill attention in Triton: queries of several tokens per sequence attending, with a
causal mask, over their paged context (the new tokens already written to the cache).

One program per (tile of BLOCK_M query rows of one sequence, query head). It walks the context
in BLOCK_N-token steps, gathering K/V rows through the block table, with an online softmax in
log2 units; the matrix products run on the tensor cores (fp16/bf16) or in exact fp32.
Covers prefill, chunked prefill, prefix-cache hits and mixed decode/prefill batches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedray.kernels import _compile as C

LOG2E = tl.constexpr(1.4426950408889634)  # jit code may only read constexpr globals
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Integers that change from step to step are not specialised on (Triton would otherwise compile
# a variant for each new "== 1" / "divisible by 16" pattern of them, ~1 s each, mid-run). The
# same holds for pointers' 16-byte alignment, hence the block table goes in whole with the row
# of its first sequence (`table_row0`) rather than as a row slice.
@triton.jit(do_not_specialize=["q_stride_t", "o_stride_t", "bt_stride", "table_row0", "num_seqs", "num_tiles"])
def _prefill_kernel(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, meta_ptr, alibi_ptr,
                    q_stride_t, q_stride_h, o_stride_t, o_stride_h, bt_stride, table_row0,
                    num_seqs, num_tiles, num_kv_heads, group, scale, soft_cap, window, k_scale, v_scale,
                    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                    KV_FP8: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    # meta: [tile_seq (num_tiles), tile_row (num_tiles), query_start (num_seqs+1), seq_len (num_seqs)]
    seq = tl.load(meta_ptr + tile)
    m0 = tl.load(meta_ptr + num_tiles + tile)
    q_begin = tl.load(meta_ptr + 2 * num_tiles + seq)
    q_len = tl.load(meta_ptr + 2 * num_tiles + seq + 1) - q_begin
    ctx = tl.load(meta_ptr + 2 * num_tiles + num_seqs + 1 + seq)
    kvh = head // group

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_SIZE
    rows = (q_begin + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * q_stride_t + head * q_stride_h + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    pos_q = ctx - q_len + offs_m
    hi = tl.minimum(ctx, ctx - q_len + m0 + BLOCK_M)
    lo = hi * 0
    if HAS_WINDOW:
        lo = tl.maximum(0, ctx - q_len + m0 - window + 1) // BLOCK_N * BLOCK_N
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + head)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        blk = tl.load(tables_ptr + (table_row0 + seq) * bt_stride + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        kv_row = (blk.to(tl.int64) * num_kv_heads + kvh) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        k = tl.load(k_ptr + kv_row[None, :] * HEAD_SIZE + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        if KV_FP8:  # e4m3 cache (kv_cache_dtype="fp8"): widen, scale, and multiply in q's dtype
            k = (k.to(tl.float32) * k_scale).to(q.dtype)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * scale
        if HAS_SOFTCAP:
            s = soft_cap * (2.0 / (1.0 + tl.exp(-2.0 * s / soft_cap)) - 1.0)  # cap * tanh(s / cap)
        if HAS_ALIBI:
            s = s + slope * (offs_n[None, :] - pos_q[:, None]).to(tl.float32)
        mask = (offs_n[None, :] <= pos_q[:, None]) & n_mask[None, :]
        if HAS_WINDOW:
            mask = mask & (offs_n[None, :] > pos_q[:, None] - window)
        s = tl.where(mask, s * LOG2E, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_row[:, None] * HEAD_SIZE + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if KV_FP8:
            v = (v.to(tl.float32) * v_scale).to(q.dtype)
        if IEEE:
            pv = tl.dot(p, v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * o_stride_t + head * o_stride_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def check_inputs(query, key_cache, value_cache, block_tables, seq_lens, query_lens, alibi_slopes,
                 allow_cpu: bool = False) -> None:
    """ValueError naming the argument for inputs the prefill kernels do not take. allow_cpu: tensors on
    the CPU too (Triton's interpreter, TRITON_INTERPRET=1, in the tests)."""
    dev = query.device
    check_device = (lambda name, t, d=None: _same_device(name, t, dev)) if allow_cpu else C.check_cuda
    check_device("query", query)
    C.check_dtype("query", query, *DTYPES)
    C.check_dim("query", query, 3)
    if query.stride(2) != 1:
        raise ValueError(f"query must be dense in its last dimension, got strides {query.stride()}")
    for name, cache in (("key_cache", key_cache), ("value_cache", value_cache)):
        check_device(name, cache, dev)
        C.check_dtype(name, cache, query.dtype,
                      *((torch.float8_e4m3fn,) if query.dtype in (torch.float16, torch.bfloat16) else ()))
        C.check_dim(name, cache, 4)
        C.check_contiguous(name, cache)
        if cache.shape[3] != query.shape[2]:
            raise ValueError(f"{name} head size {cache.shape[3]} != query head size {query.shape[2]}")
    if value_cache.shape != key_cache.shape:
        raise ValueError("value_cache shape differs from key_cache shape")
    if query.shape[1] % key_cache.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key_cache heads "
                         f"({key_cache.shape[1]})")
    check_device("block_tables", block_tables, dev)
    C.check_dtype("block_tables", block_tables, torch.int32)
    C.check_dim("block_tables", block_tables, 2)
    if block_tables.stride(1) != 1 or block_tables.shape[0] < len(seq_lens):
        raise ValueError("block_tables must have dense rows, one per sequence")
    if len(seq_lens) != len(query_lens):
        raise ValueError(f"seq_lens ({len(seq_lens)}) and query_lens ({len(query_lens)}) differ in length")
    for i, (s, q) in enumerate(zip(seq_lens, query_lens)):
        if not 0 <= q <= s:
            raise ValueError(f"query_lens[{i}] = {q} must be in [0, seq_lens[{i}] = {s}]")
        if -(-s // key_cache.shape[2]) > block_tables.shape[1]:
            raise ValueError(f"block_tables cannot hold seq_lens[{i}] = {s}")
    if sum(query_lens) > query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} rows, query_lens sum to {sum(query_lens)}")
    if alibi_slopes is not None:
        check_device("alibi_slopes", alibi_slopes, dev)
        C.check_dtype("alibi_slopes", alibi_slopes, torch.float32)
        C.check_shape("alibi_slopes", alibi_slopes, (query.shape[1],))


def _same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but query is on {device}")


def paged_prefill(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int], scale: float,
                  sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                  logits_soft_cap: float | None = None, *, out: torch.Tensor | None = None,
                  table_row0: int = 0, k_scale: float = 1.0, v_scale: float = 1.0,
                  tile: dict[str, int] | None = None) -> torch.Tensor:
    """Same contract as `reference.paged_attention` (flat queries [T, H, D] -> [T, H, D]), except
    that sequence i's block table is row table_row0 + i of `block_tables`. An FP8 (e4m3) cache under
    16-bit queries holds K / k_scale and V / v_scale; other caches ignore the scales. `tile` fixes
    BLOCK_M / BLOCK_N / NUM_WARPS / NUM_STAGES in place of the choice below (benchmarks/prefill_attention.py)."""
    if not isinstance(table_row0, int) or not 0 <= table_row0 <= block_tables.shape[0] - len(seq_lens):
        raise ValueError(f"table_row0 must be an int in [0, {block_tables.shape[0] - len(seq_lens)}] "
                         f"(block_tables rows less sequences), got {table_row0!r}")
    check_inputs(query, key_cache, value_cache, block_tables[table_row0:], seq_lens, query_lens, alibi_slopes)
    num_heads, head_size = query.shape[1], query.shape[2]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device) if out is None else out
    block_m = 16 if max(query_lens, default=0) <= 16 else 64
    block_n = 32 if head_size > 128 else 64
    if query.dtype == torch.float32 and head_size > 128:  # fp32 tiles of 256 channels: keep shared memory in bounds
        block_m = min(block_m, 32)
    tile = {"BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_WARPS": 4, "NUM_STAGES": 2, **(tile or {})}
    block_m, block_n = tile["BLOCK_M"], tile["BLOCK_N"]
    tile_seq, tile_row = [], []
    for i, q_len in enumerate(query_lens):
        for m0 in range(0, q_len, block_m):
            tile_seq.append(i)
            tile_row.append(m0)
    if not tile_seq:
        return out
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    meta = torch.tensor(tile_seq + tile_row + starts + list(seq_lens), dtype=torch.int32).to(
        query.device, non_blocking=True)
    num_kv_heads = key_cache.shape[1]
    grid = (len(tile_seq), num_heads)
    _prefill_kernel[grid](
        out, query, key_cache, value_cache, block_tables, meta,
        alibi_slopes if alibi_slopes is not None else meta,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), table_row0,
        len(query_lens), len(tile_seq), num_kv_heads, num_heads // num_kv_heads, scale,
        float(logits_soft_cap or 0.0), int(sliding_window or 0), float(k_scale), float(v_scale),
        HEAD_SIZE=head_size, HEAD_PAD=max(16, triton.next_power_of_2(head_size)),
        BLOCK_SIZE=key_cache.shape[2], BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=bool(logits_soft_cap),
        HAS_WINDOW=sliding_window is not None, IEEE=query.dtype == torch.float32,
        KV_FP8=key_cache.dtype == torch.float8_e4m3fn,
        num_warps=tile["NUM_WARPS"], num_stages=tile["NUM_STAGES"])
    return out
