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
# block masked (the plain loop, for A/B runs); NEW_KV 1 reads this step's new keys and values from the
# step's K/V tensors (given as `key`, `value`) instead of through the block table, 2 the same by TMA
# descriptors (Hopper; power-of-two head sizes), 0 everything through the block table. Keys not given
# take these defaults.
VARIANT_KEYS = ("BLOCK_M", "BLOCK_N", "NUM_WARPS", "NUM_STAGES", "SPLIT", "NEW_KV")
# (128 x 128 tiles, 3 stages, the step's K/V by TMA: the best of benchmarks/prefill_attention.py's sweep on an
# H100 from 2k to 16k; NEW_KV falls back to pointers, then to the cache, where TMA or the tensors are absent.)
DEFAULT_VARIANT = {"BLOCK_M": 128, "BLOCK_N": 128, "NUM_WARPS": 8, "NUM_STAGES": 3, "SPLIT": 1, "NEW_KV": 2}
# Batches whose longest query has at most this many rows take half-height tiles.
SHORT_QUERY = 64


# Triton's CPU interpreter (TRITON_INTERPRET=1 when this module was imported: `triton.jit` reads it
# as it decorates) takes CPU tensors; the tests run the kernel that way.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _load_kv(k_ptr, v_ptr, table_ptr, kn, vn, kn_stride_t, vn_stride_t, row_shift, kvh, num_kv_heads, start, hi, offs_d, d_mask,
             HEAD_SIZE: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
             OFFS64: tl.constexpr, SOURCE: tl.constexpr, MASKED: tl.constexpr):
    """K and V rows [start, start + BLOCK_N) as [BLOCK_N, HEAD_PAD]: SOURCE 0 from the paged cache through
    the block table; 1 from this step's new K/V (row n + row_shift) by pointers; 2 the same by TMA
    descriptors. MASKED: rows at or past hi read as 0 (TMA reads them: finite rows of the next sequence,
    or zeros past the tensor, which the scores' mask drops)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hi
    if SOURCE == 2:
        k = kn.load([start + row_shift, kvh * HEAD_SIZE])
        v = vn.load([start + row_shift, kvh * HEAD_SIZE])
    else:
        if SOURCE == 0:
            if MASKED:
                blk = tl.load(table_ptr + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
            else:
                blk = tl.load(table_ptr + offs_n // BLOCK_SIZE)
            if OFFS64:
                blk = blk.to(tl.int64)
            rows = (blk * num_kv_heads + kvh) * BLOCK_SIZE + offs_n % BLOCK_SIZE
            offs = rows[:, None] * HEAD_SIZE + offs_d[None, :]
            kp = k_ptr + offs
            vp = v_ptr + offs
        else:
            rows = (offs_n + row_shift).to(tl.int64)
            kp = kn + (rows * kn_stride_t + kvh * HEAD_SIZE)[:, None] + offs_d[None, :]
            vp = vn + (rows * vn_stride_t + kvh * HEAD_SIZE)[:, None] + offs_d[None, :]
        if MASKED:
            k = tl.load(kp, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
            v = tl.load(vp, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        elif EVEN_D:
            k = tl.load(kp)
            v = tl.load(vp)
        else:
            k = tl.load(kp, mask=d_mask[None, :], other=0.0)
            v = tl.load(vp, mask=d_mask[None, :], other=0.0)
    return k, v


@triton.jit
def _key_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, kn, vn, kn_stride_t, vn_stride_t, row_shift, kvh, num_kv_heads,
                pos_q, offs_d, d_mask, lo, hi, qk_scale, scale, soft_cap, window, slope,
                HEAD_SIZE: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_WINDOW: tl.constexpr, KV_FP8: tl.constexpr, OFFS64: tl.constexpr, SOURCE: tl.constexpr,
                MASKED: tl.constexpr):
    """Online softmax over the keys [lo, hi) in BLOCK_N steps, read from SOURCE (`_load_kv`). MASKED:
    apply the causal (and window) mask and the bounds check at hi; else every row of the tile sees
    every key of [lo, hi)."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_ptr, v_ptr, table_ptr, kn, vn, kn_stride_t, vn_stride_t, row_shift, kvh, num_kv_heads, start, hi,
                        offs_d, d_mask, HEAD_SIZE, EVEN_D, BLOCK_SIZE, BLOCK_N, OFFS64, SOURCE, MASKED)
        if KV_FP8 and SOURCE == 0:  # e4m3 widens exactly to 16 bits; the scales are applied outside the products
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
            visible = (offs_n[None, :] <= pos_q[:, None]) & (offs_n < hi)[None, :]
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
# prefill_triton. The row strides of q, out and the step's K/V are: they are fixed by the model (a fused
# QKV width), and knowing them multiples of 16 lets every row's load and store be 16-byte vectors.
@triton.jit(do_not_specialize=["bt_stride", "table_row0", "num_seqs", "num_tiles"])
def _flash_prefill_kernel(out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, meta_ptr, alibi_ptr, kn, vn,
                          q_stride_t, q_stride_h, o_stride_t, o_stride_h, bt_stride, table_row0, kn_stride_t, vn_stride_t,
                          num_seqs, num_tiles, num_heads, num_kv_heads, group, qk_scale, scale, soft_cap,
                          window, v_scale,
                          HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_ALIBI: tl.constexpr,
                          HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, KV_FP8: tl.constexpr,
                          OFFS64: tl.constexpr, SPLIT: tl.constexpr, NEW_KV: tl.constexpr):
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
    lo = first * 0
    if HAS_WINDOW:
        lo = tl.maximum(0, first - window + 1) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_PAD], 0.0, tl.float32)
    # With NEW_KV the keys before this step's first new token come from the cache, every one seen by
    # every row (only a window masks them), and the new ones from the step's K/V; else all from the cache.
    b_lo = lo
    row_shift = q_begin - (ctx - q_len)             # new key n is row n + row_shift of the step's K/V
    if NEW_KV:
        b_lo = tl.maximum(lo, ctx - q_len)
        a_full = lo
        if not HAS_WINDOW:
            a_full = lo + (b_lo - lo) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, kn, vn, kn_stride_t, vn_stride_t, row_shift,
                                    kvh, num_kv_heads, pos_q, offs_d, d_mask, lo, a_full, qk_scale, scale, soft_cap,
                                    window, slope, HEAD_SIZE, HEAD_SIZE == HEAD_PAD, BLOCK_SIZE, BLOCK_N, HAS_ALIBI,
                                    HAS_SOFTCAP, HAS_WINDOW, KV_FP8, OFFS64, 0, False)
        acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, kn, vn, kn_stride_t, vn_stride_t, row_shift,
                                    kvh, num_kv_heads, pos_q, offs_d, d_mask, a_full, b_lo, qk_scale, scale, soft_cap,
                                    window, slope, HEAD_SIZE, HEAD_SIZE == HEAD_PAD, BLOCK_SIZE, BLOCK_N, HAS_ALIBI,
                                    HAS_SOFTCAP, HAS_WINDOW, KV_FP8, OFFS64, 0, True)
    b_full = b_lo
    if SPLIT and not HAS_WINDOW:
        b_full = b_lo + (first + 1 - b_lo) // BLOCK_N * BLOCK_N   # blocks before the tile's first row: seen whole
    acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, kn, vn, kn_stride_t, vn_stride_t, row_shift,
                                kvh, num_kv_heads, pos_q, offs_d, d_mask, b_lo, b_full, qk_scale, scale, soft_cap,
                                window, slope, HEAD_SIZE, HEAD_SIZE == HEAD_PAD, BLOCK_SIZE, BLOCK_N, HAS_ALIBI,
                                HAS_SOFTCAP, HAS_WINDOW, KV_FP8, OFFS64, NEW_KV, False)
    acc, l_i, m_i = _key_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, kn, vn, kn_stride_t, vn_stride_t, row_shift,
                                kvh, num_kv_heads, pos_q, offs_d, d_mask, b_full, hi, qk_scale, scale, soft_cap,
                                window, slope, HEAD_SIZE, HEAD_SIZE == HEAD_PAD, BLOCK_SIZE, BLOCK_N, HAS_ALIBI,
                                HAS_SOFTCAP, HAS_WINDOW, KV_FP8, OFFS64, NEW_KV, True)
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
    if chosen["NEW_KV"] not in (0, 1, 2):
        raise ValueError(f"prefill variant NEW_KV must be 0, 1 or 2, got {chosen['NEW_KV']}")
    return chosen


def _tensor_descriptor():
    """Triton's host-side TMA descriptor class (Triton >= 3.4), or None."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


def _new_kv_source(mode: int, query, key, value, key_cache, block_n: int, rows: int):
    """(NEW_KV, kn, vn, kn row stride, vn row stride) for the launch: the step's K/V ([T, Hkv, D] views, heads dense in a
    row) by pointers or TMA descriptors, or mode 0 (the cache) where they are absent or the cache is FP8
    (its K/V are the new ones quantized: the new rows must be read the same way as the prefix)."""
    if not mode or key is None or value is None or key_cache.dtype == torch.float8_e4m3fn:
        return 0, key_cache, key_cache, 0, 0
    num_kv_heads, head_size = key_cache.shape[1], key_cache.shape[3]
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype or t.device != query.device or t.dim() != 3 or t.shape[0] < rows \
                or tuple(t.shape[1:]) != (num_kv_heads, head_size) or t.stride(2) != 1 or t.stride(1) != head_size:
            raise ValueError(f"{name} must be [>= {rows}, {num_kv_heads}, {head_size}] {query.dtype} on {query.device} "
                             f"with dense heads, got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
    # (K and V may have different row strides: the rotary kernel writes K anew, V stays a view of QKV.)
    descriptor = _tensor_descriptor() if mode == 2 else None
    tma = (descriptor is not None and head_size == triton.next_power_of_2(head_size) and head_size >= 16
           and all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in (key, value)))
    if not tma:
        return 1, key, value, key.stride(0), value.stride(0)
    shape, block = [key.shape[0], num_kv_heads * head_size], [block_n, head_size]
    return (2, descriptor(key, shape, [key.stride(0), 1], block), descriptor(value, shape, [value.stride(0), 1], block),
            key.stride(0), value.stride(0))


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
                  variant_overrides: dict[str, int] | None = None, key: torch.Tensor | None = None,
                  value: torch.Tensor | None = None) -> torch.Tensor:
    """`prefill_triton.paged_prefill`'s contract; `variant_overrides` fixes tile constants (VARIANT_KEYS).
    `key`, `value`: this step's new K/V ([T, Hkv, D], row t the token of query row t, the same values
    the cache holds for it), read in place of the cache under NEW_KV. Launches this module's cases
    doesn't cover go to `prefill_triton`."""
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
    new_kv, kn, vn, kn_stride, vn_stride = _new_kv_source(cfg["NEW_KV"], query, key, value, key_cache, cfg["BLOCK_N"],
                                               starts[-1])
    _flash_prefill_kernel[(len(tile_seq) * num_heads,)](
        out, query, key_cache, value_cache, block_tables, meta,
        alibi_slopes if alibi_slopes is not None else meta, kn, vn,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), table_row0,
        kn_stride, vn_stride, len(query_lens), len(tile_seq), num_heads, num_kv_heads, num_heads // num_kv_heads,
        scale * k_scale * 1.4426950408889634, scale * k_scale, float(logits_soft_cap or 0.0),
        int(sliding_window or 0), v_scale,
        HEAD_SIZE=head_size, HEAD_PAD=max(16, triton.next_power_of_2(head_size)),
        BLOCK_SIZE=key_cache.shape[2], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=bool(logits_soft_cap),
        HAS_WINDOW=sliding_window is not None, KV_FP8=fp8, OFFS64=key_cache.numel() >= 2 ** 31,
        SPLIT=bool(cfg["SPLIT"]), NEW_KV=new_kv, num_warps=cfg["NUM_WARPS"], num_stages=cfg["NUM_STAGES"])
    return out
