"""Paged prefill attention in Triton, FlashAttention-2/3 style: the prefill and mixed-step kernel of
`KernelOptions(prefill_backend="triton_flash")`.

Same contract as `prefill_triton.paged_prefill` (queries of several tokens per sequence attending,
causally, over their paged context with the new tokens already in the cache). What differs:

- Tiles of BLOCK_M=128 query rows on 8 warps (two warpgroups of wgmma on Hopper), BLOCK_N keys
  per step, software-pipelined K/V loads (num_stages).
- The key loop is split in two: the blocks every row of the tile sees whole (no mask, no bounds
  checks, no "nothing visible yet" guard) and the few blocks on the causal diagonal (masked). A
  sliding window runs every block masked.
- The softmax scale (times log2 e, and an FP8 cache's k_scale) is applied in the exponent's fused
  multiply-add; an FP8 cache's v_scale multiplies the output once.
- A 1-D grid with the query heads of one tile adjacent (the heads of a GQA group read the same K/V
  from L2 together), and the tiles ordered longest first (causal tiles differ in work by up to
  the context length; the long ones start first so the short ones fill the tail).

Cases it leaves to `prefill_triton` (the launcher routes them there): float32 queries (the exact
IEEE path), head sizes above 128, batches whose longest query is at most 16 rows (decode rows
only), a non-positive scale.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pagedray.kernels import prefill_triton

LOG2E = tl.constexpr(1.4426950408889634)
# The tile of a launch: rows per tile, keys per step, warps, pipeline stages; SPLIT 0 runs every key
# block masked (the plain loop, for A/B runs). Keys not given take these defaults.
VARIANT_KEYS = ("BLOCK_M", "BLOCK_N", "NUM_WARPS", "NUM_STAGES", "SPLIT")
DEFAULT_VARIANT = {"BLOCK_M": 128, "BLOCK_N": 64, "NUM_WARPS": 8, "NUM_STAGES": 3, "SPLIT": 1}
# Batches whose longest query has at most this many rows take half-height tiles.
SHORT_QUERY = 64


# Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported: `triton.jit` reads it
# as it decorates) takes CPU tensors; the tests run the kernel that way.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _key_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, kvh, num_kv_heads, pos_q, offs_d, d_mask,
                lo, hi, qk_scale, scale, soft_cap, window, slope,
                HEAD_SIZE: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_WINDOW: tl.constexpr, KV_FP8: tl.constexpr, OFFS64: tl.constexpr, MASKED: tl.constexpr):
    """Online softmax over the keys [lo, hi) in BLOCK_N steps. MASKED: apply the causal (and window)
    mask and the bounds check at hi; else every row of the tile sees every key of [lo, hi)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        if MASKED:
            blk = tl.load(table_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        else:
            blk = tl.load(table_ptr + offs_n // BLOCK_SIZE)
        if OFFS64:
            blk = blk.to(tl.int64)
        kv_rows = (blk * num_kv_heads + kvh) * BLOCK_SIZE + offs_n % BLOCK_SIZE
        kv_offs = kv_rows[:, None] * HEAD_SIZE + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptr + kv_offs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            v = tl.load(v_ptr + kv_offs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptr + kv_offs)
            v = tl.load(v_ptr + kv_offs)
        else:
            k = tl.load(k_ptr + kv_offs, mask=d_mask[None, :], other=0.0)
            v = tl.load(v_ptr + kv_offs, mask=d_mask[None, :], other=0.0)
        if KV_FP8:  # e4m3 widens exactly to 16 bits; the scales are applied outside the products
            k = k.to(q.dtype)
            v = v.to(q.dtype)
        s = tl.dot(q, tl.trans(k))
        if HAS_SOFTCAP or HAS_ALIBI:  # logits in natural units first, then log2 units
            s = s * scale
            if HAS_SOFTCAP:
                s = soft_cap * (2.0 / (1.0 + tl.exp(-2.0 * s / soft_cap)) - 1.0)  # cap * tanh(s / cap)
            if HAS_ALIBI:
                s = s + slope * (offs_n[None, :] - pos_q[:, None]).to(tl.float32)
            s = s * LOG2E
            factor = 1.0
        else:
            factor = qk_scale
        if MASKED:
            visible = (offs_n[None, :] <= pos_q[:, None]) & n_mask[None, :]
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > pos_q[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * factor)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * factor)
            m_use = m_new
        p = tl.exp2(s * factor - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


# Step-varying integers are not specialised on (a recompile per new "== 1" / "% 16" pattern), as in
# prefill_triton.
@triton.jit(do_not_specialize=["q_stride_t", "o_stride_t", "bt_stride", "table_row0", "num_seqs", "num_tiles"])
def _flash_prefill_kernel(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, meta_ptr, alibi_ptr,
                          q_stride_t, q_stride_h, o_stride_t, o_stride_h, bt_stride, table_row0,
                          num_seqs, num_tiles, num_heads, num_kv_heads, group, qk_scale, scale, soft_cap,
                          window, v_scale,
                          HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, KV_FP8: tl.constexpr,
                          OFFS64: tl.constexpr, SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    head = pid % num_heads
    tile = pid // num_heads
    # meta: [tile_seq (num_tiles), tile_row (num_tiles), query_start (num_seqs+1), seq_len (num_seqs)]
    seq = tl.load(meta_ptr + tile)
    m0 = tl.load(meta_ptr + num_tiles + tile)
    q_begin = tl.load(meta_ptr + 2 * num_tiles + seq)
    q_len = tl.load(meta_ptr + 2 * num_tiles + seq + 1) - q_begin
    ctx = tl.load(meta_ptr + 2 * num_tiles + num_seqs + 1 + seq)
    kvh = head // group
    table_ptr = tables_ptr + (table_row0 + seq).to(tl.int64) * bt_stride

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_SIZE
    rows = (q_begin + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * q_stride_t + head * q_stride_h + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    first = ctx - q_len + m0                        # the tile's first query position
    pos_q = first + tl.arange(0, BLOCK_M)
    hi = tl.minimum(ctx, first + BLOCK_M)           # keys past the tile's last row are never seen
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + head)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    if HAS_WINDOW:
        lo = tl.maximum(0, first - window + 1) // BLOCK_N * BLOCK_N
        full = lo
    elif SPLIT:
        lo = 0
        full = (first + 1) // BLOCK_N * BLOCK_N     # blocks before the tile's first row: seen whole
    else:
        lo = 0
        full = 0
    acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, kvh, num_kv_heads, pos_q, offs_d,
                                d_mask, lo, full, qk_scale, scale, soft_cap, window, slope,
                                HEAD_SIZE, HEAD_SIZE == HEAD_PAD, BLOCK_SIZE, BLOCK_N, HAS_ALIBI, HAS_SOFTCAP,
                                HAS_WINDOW, KV_FP8, OFFS64, False)
    acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, kvh, num_kv_heads, pos_q, offs_d,
                                d_mask, full, hi, qk_scale, scale, soft_cap, window, slope,
                                HEAD_SIZE, HEAD_SIZE == HEAD_PAD, BLOCK_SIZE, BLOCK_N, HAS_ALIBI, HAS_SOFTCAP,
                                HAS_WINDOW, KV_FP8, OFFS64, True)
    out = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    tl.store(out_ptr + rows[:, None] * o_stride_t + head * o_stride_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def variant(overrides: dict[str, int] | None, max_query_len: int) -> dict[str, int]:
    """The launch's tile: the defaults, half-height tiles for short queries, then `overrides`."""
    chosen = dict(DEFAULT_VARIANT)
    if max_query_len <= SHORT_QUERY:
        chosen.update(BLOCK_M=64, NUM_WARPS=4)
    chosen.update(overrides or {})
    unknown = set(chosen) - set(VARIANT_KEYS)
    if unknown:
        raise ValueError(f"prefill variant keys must be among {VARIANT_KEYS}, got {sorted(unknown)}")
    for key in ("BLOCK_M", "BLOCK_N"):
        if chosen[key] not in (16, 32, 64, 128, 256):
            raise ValueError(f"prefill variant {key} must be a power of two in [16, 256], got {chosen[key]}")
    return chosen


def covers(query: torch.Tensor, max_query_len: int, scale: float) -> bool:
    """Whether this kernel takes the launch (else `prefill_triton` runs it, see the module doc)."""
    return (query.dtype in (torch.float16, torch.bfloat16) and query.dim() == 3 and query.shape[-1] <= 128
            and max_query_len > 16 and scale > 0)


def tiles(query_lens: list[int], seq_lens: list[int], block_m: int) -> tuple[list[int], list[int]]:
    """(sequence, first row) of each tile, the tiles with the most keys to read first."""
    work = []
    for i, (q_len, ctx) in enumerate(zip(query_lens, seq_lens)):
        for m0 in range(0, q_len, block_m):
            work.append((min(ctx, ctx - q_len + m0 + block_m), i, m0))
    work.sort(key=lambda w: -w[0])
    return [w[1] for w in work], [w[2] for w in work]


def paged_prefill(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int], scale: float,
                  sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                  logits_soft_cap: float | None = None, *, out: torch.Tensor | None = None,
                  table_row0: int = 0, k_scale: float = 1.0, v_scale: float = 1.0,
                  variant_overrides: dict[str, int] | None = None) -> torch.Tensor:
    """`prefill_triton.paged_prefill`'s contract; `variant_overrides` fixes tile constants (VARIANT_KEYS).
    Launches this module's cases doesn't cover go to `prefill_triton`."""
    max_q = max(query_lens, default=0)
    if not covers(query, max_q, scale):
        return prefill_triton.paged_prefill(query, key_cache, value_cache, block_tables, seq_lens, query_lens,
                                            scale, sliding_window, alibi_slopes, logits_soft_cap, out=out,
                                            table_row0=table_row0, k_scale=k_scale, v_scale=v_scale)
    if not isinstance(table_row0, int) or not 0 <= table_row0 <= block_tables.shape[0] - len(seq_lens):
        raise ValueError(f"table_row0 must be an int in [0, {block_tables.shape[0] - len(seq_lens)}] "
                         f"(block_tables rows less sequences), got {table_row0!r}")
    prefill_triton.check_inputs(query, key_cache, value_cache, block_tables[table_row0:], seq_lens, query_lens,
                                alibi_slopes, allow_cpu=INTERPRETED)
    cfg = variant(variant_overrides, max_q)
    num_heads, head_size = query.shape[1], query.shape[2]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device) if out is None else out
    tile_seq, tile_row = tiles(query_lens, seq_lens, cfg["BLOCK_M"])
    if not tile_seq:
        return out
    starts = [0]
    for q_len in query_lens:
        starts.append(starts[-1] + q_len)
    meta = torch.tensor(tile_seq + tile_row + starts + list(seq_lens), dtype=torch.int32).to(
        query.device, non_blocking=True)
    fp8 = key_cache.dtype == torch.float8_e4m3fn
    k_scale, v_scale = (float(k_scale), float(v_scale)) if fp8 else (1.0, 1.0)
    num_kv_heads = key_cache.shape[1]
    _flash_prefill_kernel[(len(tile_seq) * num_heads,)](
        out, query, key_cache, value_cache, block_tables, meta,
        alibi_slopes if alibi_slopes is not None else meta,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), table_row0,
        len(query_lens), len(tile_seq), num_heads, num_kv_heads, num_heads // num_kv_heads,
        scale * k_scale * 1.4426950408889634, scale * k_scale, float(logits_soft_cap or 0.0),
        int(sliding_window or 0), v_scale,
        HEAD_SIZE=head_size, HEAD_PAD=max(16, triton.next_power_of_2(head_size)),
        BLOCK_SIZE=key_cache.shape[2], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=bool(logits_soft_cap),
        HAS_WINDOW=sliding_window is not None, KV_FP8=fp8, OFFS64=key_cache.numel() >= 2 ** 31,
        SPLIT=bool(cfg["SPLIT"]), num_warps=cfg["NUM_WARPS"], num_stages=cfg["NUM_STAGES"])
    return out
