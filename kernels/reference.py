"""Plain-PyTorch references for every kernel.

They run on CPU (and on GPU as a fallback) and are the oracle the CUDA kernels
are tested against. Layouts:
  key_cache / value_cache: [num_blocks, num_kv_heads, block_size, head_size]
  (one block of one head is contiguous, which is what the decode kernel reads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


FP8_CACHE = torch.float8_e4m3fn
_FP8_MAX = 448.0


def _to_cache(x: torch.Tensor, cache: torch.Tensor, scale: float) -> torch.Tensor:
    """x as stored in `cache`: an FP8 cache holds e4m3(x / scale), saturated at ±448 (vLLM's
    per-tensor kv scales); other caches hold x in their dtype and ignore the scale."""
    if cache.dtype != FP8_CACHE:
        return x.to(cache.dtype)
    return (x.float() / scale).clamp(-_FP8_MAX, _FP8_MAX).to(FP8_CACHE)


def from_cache(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Cached K or V back in float32 (an FP8 cache's values times its scale)."""
    return x.float() * scale if x.dtype == FP8_CACHE else x


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> None:
    """Write K/V of new tokens [T, Hkv, D] into their cache slots; slot -1 is skipped."""
    block_size = key_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    blocks = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots % block_size
    key_cache[blocks, :, offsets, :] = _to_cache(key[keep], key_cache, k_scale)
    value_cache[blocks, :, offsets, :] = _to_cache(value[keep], value_cache, v_scale)


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` cached positions of one sequence: [seq_len, Hkv, D]."""
    block_size = cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [nb, Hkv, bs, D]
    return blocks.transpose(1, 2).reshape(-1, cache.shape[1], cache.shape[3])[:seq_len]


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
           sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
           logits_soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of the last q_len positions of a sequence over all its keys.

    query [q, H, D]; key/value [k, Hkv, D] with k >= q; the queries sit at
    positions k-q .. k-1. Returns [q, H, D] in query's dtype (math in float32).
    """
    q_len, num_heads, _ = query.shape
    k_len, num_kv_heads, _ = key.shape
    group = num_heads // num_kv_heads
    q = query.float().transpose(0, 1)  # [H, q, D]
    k = key.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, k, D]
    v = value.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [H, q, k]
    if logits_soft_cap:
        scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
    k_pos = torch.arange(k_len, device=query.device)[None, :]
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.float()[:, None, None] * (k_pos - q_pos)[None]
    mask = k_pos > q_pos
    if sliding_window is not None:
        mask |= k_pos <= q_pos - sliding_window
    scores.masked_fill_(mask[None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)  # [H, q, D]
    return out.transpose(0, 1).to(query.dtype)


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int],
                    scale: float, sliding_window: int | None = None,
                    alibi_slopes: torch.Tensor | None = None,
                    logits_soft_cap: float | None = None, k_scale: float = 1.0,
                    v_scale: float = 1.0) -> torch.Tensor:
    """Attention of flat queries [T, H, D] over each sequence's paged context.

    Sequence i owns the next query_lens[i] rows of `query`; its context is the
    first seq_lens[i] slots of its block table (the new tokens already written).
    Covers decode, prefill, chunked prefill and prefix-cache hits alike.
    """
    out = torch.empty_like(query)
    start = 0
    for i, (seq_len, q_len) in enumerate(zip(seq_lens, query_lens)):
        keys = from_cache(_gather_context(key_cache, block_tables[i], seq_len), k_scale)
        values = from_cache(_gather_context(value_cache, block_tables[i], seq_len), v_scale)
        out[start:start + q_len] = attend(query[start:start + q_len], keys, values, scale,
                                          sliding_window, alibi_slopes, logits_soft_cap)
        start += q_len
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x; return (rms_norm(residual), residual)."""
    residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm(residual, weight, eps), residual


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the first rotary_dim channels of each head.

    query [T, H, D], key [T, Hkv, D]; cos_sin_cache [max_pos, rotary_dim] holding
    cos in the first half of the last dim and sin in the second.
    NeoX layout rotates (x[:half], x[half:]); GPT-J layout rotates even/odd pairs.
    """
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [T, rd/2]
    cos, sin = cos[:, None, :], sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., :rotary_dim].float(), x[..., rotary_dim:]
        if is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
            rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        return torch.cat([rot.to(x.dtype), rest], dim=-1)

    return rotate(query), rotate(key)


def rotary_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cos_sin_cache: torch.Tensor, is_neox: bool, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:
    """rotary_embedding, then reshape_and_cache of the rotated key and value; returns the rotated query."""
    query, key = rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    return query


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · weight^T (+ bias) in float32 (the skinny GEMM's oracle; it returns x's dtype)."""
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(x.dtype)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return (F.gelu(gate.float(), approximate=approximate) * up.float()).to(x.dtype)


def copy_blocks(kv_caches: list[torch.Tensor], src_to_dst: list[tuple[int, int]]) -> None:
    """Copy whole blocks (copy-on-write) in every layer's [2, NB, Hkv, BS, D] cache."""
    if not src_to_dst:
        return
    src = torch.tensor([s for s, _ in src_to_dst], device=kv_caches[0].device)
    dst = torch.tensor([d for _, d in src_to_dst], device=kv_caches[0].device)
    for cache in kv_caches:
        cache[:, dst] = cache[:, src]


def paged_decode_split(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                       block_tables: torch.Tensor, seq_lens: list[int], scale: float, partition_size: int,
                       sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                       logits_soft_cap: float | None = None) -> torch.Tensor:
    """Decode attention (query [S, H, D], one token per sequence) the two-pass way.

    Each partition of `partition_size` context tokens yields a max m_p, a sum
    l_p and a normalised output o_p; they combine as
    sum_p exp(m_p - M) l_p o_p / sum_p exp(m_p - M) l_p, with M = max_p m_p.
    Equal to `paged_attention` up to rounding: the oracle of the CUDA kernel's
    split variant. A sequence of length 0 yields zeros.
    """
    num_heads = query.shape[1]
    out = torch.zeros_like(query)
    for i, seq_len in enumerate(seq_lens):
        if seq_len == 0:
            continue
        keys = _gather_context(key_cache, block_tables[i], seq_len).float()
        values = _gather_context(value_cache, block_tables[i], seq_len).float()
        group = num_heads // keys.shape[1]
        k = keys.repeat_interleave(group, dim=1)  # [k, H, D]
        v = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", query[i].float(), k) * scale  # [H, k]
        if logits_soft_cap:
            scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
        pos = torch.arange(seq_len, device=query.device)
        if alibi_slopes is not None:
            scores = scores + alibi_slopes.float()[:, None] * (pos - (seq_len - 1))[None]
        if sliding_window is not None:
            scores = scores.masked_fill((pos <= seq_len - 1 - sliding_window)[None], float("-inf"))
        ms, ls, os_ = [], [], []
        for start in range(0, seq_len, partition_size):
            s = scores[:, start:start + partition_size]
            m = s.max(dim=-1).values
            p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m)[:, None])
            l = p.sum(dim=-1)
            o = torch.einsum("hk,khd->hd", p, v[start:start + partition_size])
            ms.append(m)
            ls.append(l)
            os_.append(o / torch.where(l > 0, l, torch.ones_like(l))[:, None])
        m, l, o = torch.stack(ms), torch.stack(ls), torch.stack(os_)  # [P, H], [P, H], [P, H, D]
        w = torch.where(l > 0, torch.exp(m - m.max(dim=0).values) * l, torch.zeros_like(l))
        out[i] = ((w[:, :, None] * o).sum(0) / w.sum(0)[:, None]).to(query.dtype)
    return out


# -- one-pass sampling (sample.cu) -----------------------------------------------------------------
_M32 = 0xFFFFFFFF
_ONE_BELOW = 1.0 - 2.0 ** -24   # the largest float32 below 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32) in int64, split so no product overflows."""
    low = (x & 0xFFFF) * c
    high = (((x >> 16) * c) & 0xFFFF) << 16
    return (low + high) & _M32


def fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 values in [0, 2**32): a bijection with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def race_keys(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The float32 key [R, V] whose per-row argmax is the token (sample.cu's function).

    Greedy rows (temperature <= 0 or NaN): the logit. Random rows: logit * (1/T) - log(E) with
    E = -log1p(-W), W = min((h + 0.5) 2^-32, 1 - 2^-24), h = fmix32(fmix32(token ^ k0) ^ k1): the
    exponential race argmax p_i / E_i in the log domain (a draw from softmax(logits / T)).
    """
    lf = logits.float()
    tokens = torch.arange(lf.shape[-1], dtype=torch.int64, device=lf.device)[None, :]
    k = keys.long() & _M32
    h = fmix32(fmix32(tokens ^ k[:, :1]) ^ k[:, 1:2])
    w = ((h.float() + 0.5) * 2.0 ** -32).clamp_max(_ONE_BELOW)
    noise = torch.log(-torch.log1p(-w))
    t = temperatures.float()
    random = (lf * (1.0 / t)[:, None]) - noise
    return torch.where((t > 0)[:, None], random, lf)


def race_sample(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """int64 [R]: per row, the argmax of race_keys (ties -> lowest index; NaN wins, as torch.argmax)."""
    return race_keys(logits, temperatures, keys).argmax(dim=-1)
