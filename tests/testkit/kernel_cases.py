"""Inputs for the kernel tests: paged KV caches built from known per-sequence K/V, and an
independent dense attention (float64, one head at a time) to check the references against."""
from __future__ import annotations

import math

import torch


def make_paged(seq_lens: list[int], num_kv_heads: int, head_size: int, block_size: int,
               dtype: torch.dtype, device: str | torch.device = "cpu", extra_blocks: int = 3):
    """Random K/V per sequence scattered over shuffled cache blocks.

    Every slot no sequence owns (the tails of last blocks, the spare blocks)
    holds NaN, and block-table padding points at a spare (NaN) block, so a
    kernel reading past a sequence's end, or through padding, returns NaN.
    Returns (key_cache, value_cache, block_tables int32, keys, values) with
    keys[i]/values[i] of shape [seq_lens[i], Hkv, D].
    """
    counts = [math.ceil(s / block_size) for s in seq_lens]
    total = sum(counts) + extra_blocks
    perm = torch.randperm(total).tolist()
    shape = (total, num_kv_heads, block_size, head_size)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
    spare = perm[sum(counts)]
    block_tables = torch.full((len(seq_lens), max(counts + [1])), spare, dtype=torch.int32)
    keys, values, used = [], [], 0
    for i, (seq_len, count) in enumerate(zip(seq_lens, counts)):
        block_tables[i, :count] = torch.tensor(perm[used:used + count], dtype=torch.int32)
        used += count
        k = torch.randn(seq_len, num_kv_heads, head_size, device=device).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_size, device=device).to(dtype)
        for t in range(0, seq_len, block_size):
            blk = int(block_tables[i, t // block_size])
            n = min(block_size, seq_len - t)
            key_cache[blk, :, :n] = k[t:t + n].transpose(0, 1)
            value_cache[blk, :, :n] = v[t:t + n].transpose(0, 1)
        keys.append(k)
        values.append(v)
    return key_cache, value_cache, block_tables.to(device), keys, values


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                    logits_soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of the last q_len positions, float64, head by head. q [q, H, D], k/v [k, Hkv, D]."""
    q_len, num_heads, _ = q.shape
    k_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    rows = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)  # absolute query positions
    cols = torch.arange(k_len, device=q.device)[None, :]
    allowed = cols <= rows
    if sliding_window is not None:
        allowed &= cols > rows - sliding_window
    for h in range(num_heads):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        s = (q[:, h].double() @ kh.T) * scale
        if logits_soft_cap:
            s = logits_soft_cap * torch.tanh(s / logits_soft_cap)
        if alibi_slopes is not None:
            s = s + float(alibi_slopes[h]) * (cols - rows).double()
        s = s.masked_fill(~allowed, float("-inf"))
        out[:, h] = torch.softmax(s, dim=-1) @ vh
    return out


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The geometric ALiBi slopes (powers of 2^(-8/H))."""
    return torch.tensor([2 ** (-8 * (h + 1) / num_heads) for h in range(num_heads)], dtype=torch.float32)


def set_kernel_options(monkeypatch, **changes) -> None:
    """This process's kernel options with `changes` (KernelOptions fields) until the test ends,
    as a worker built from a config with them would install."""
    import dataclasses

    from pagedray.kernels import options
    monkeypatch.setattr(options, "_current", dataclasses.replace(options.current(), **changes))
