"""The batched LoRA kernels in Triton (see lora.py): shrink x -> x A^T and expand y += (x A^T) B,
each token with its own slot's A [slots, R, K] and B [slots, R, N].

Tokens arrive sorted by slot (`order`), so a tile of BLOCK_T tokens (16 in decode batches, 64 in
prefill) holds a contiguous range of slots, mostly one: a program walks only the slots of its tile
(from its first token's to its last's), gathering its tokens' rows through `order` and writing only the rows of the slot in
hand, so every output row is written by exactly one program (no atomics, deterministic). The
shrink's long reduction (hidden or intermediate size) is split over K into `splits` partial sums
(fp32, [splits, T, R]), which the expand adds up as it loads them: a decode batch of a few tiles
still fills the GPU. Grids and arguments depend only on the token count and the stacks' shapes,
so the launches are captured in CUDA graphs as they are and replay with the indices changed in
place; tokens without an adapter (slot -1) are skipped and their rows left untouched.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagedray.kernels import _compile as C


def _block_t(num_tokens: int) -> int:
    """Tokens per tile: 16 for decode batches; 64 for prefill, so each B tile is read 4x less often."""
    return 16 if num_tokens <= 512 else 64


def _shrink_splits(num_tokens: int, k: int, block_k: int, x: torch.Tensor) -> int:
    """Partial sums along K so the grid covers the GPU: a decode batch is a handful of tiles, and one
    program per tile walking all of K left all but a few SMs idle (measured: 8 adapters at batch 256
    ran at 0.61x the base model on an H100). At least 2 BLOCK_K steps per split."""
    tiles = triton.cdiv(num_tokens, _block_t(num_tokens))
    # (under the interpreter, CPU tests: a few splits, as a small GPU would get)
    sms = C.num_sms(C.device_of(x)) if x.is_cuda else 8
    return max(1, min(triton.cdiv(sms, tiles), k // (2 * block_k)))


@triton.jit
def _tile(idx_ptr, order_ptr, num_tokens, BLOCK_T: tl.constexpr):
    """This program's token rows, their slots, whether they are real, and its slot range."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = offs_t < num_tokens
    rows = tl.load(order_ptr + offs_t, mask=t_in, other=0).to(tl.int64)
    slots = tl.load(idx_ptr + rows, mask=t_in, other=-1)
    lo = tl.maximum(tl.min(tl.where(t_in & (slots >= 0), slots, 2147483647), axis=0), 0)
    hi = tl.max(slots, axis=0)   # tokens are sorted by slot: the tile's slots are lo..hi
    return rows, slots, t_in, lo, hi


@triton.jit(do_not_specialize=["num_tokens"])
def _shrink_kernel(x_ptr, a_ptr, idx_ptr, order_ptr, out_ptr, num_tokens, R, K, k_per_split,
                   x_stride, a_stride_s, a_stride_r, out_stride_split, out_stride_t,
                   IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows, slots, t_in, lo, hi = _tile(idx_ptr, order_ptr, num_tokens, BLOCK_T)
    split = tl.program_id(1)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    for s in range(lo, hi + 1):
        mine = t_in & (slots == s)
        acc = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        a_base = a_ptr + s * a_stride_s
        for k0 in range(k_begin, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_in = offs_k < k_end
            x = tl.load(x_ptr + rows[:, None] * x_stride + offs_k[None, :], mask=mine[:, None] & k_in[None, :],
                        other=0.0)
            a = tl.load(a_base + offs_r[None, :] * a_stride_r + offs_k[:, None], mask=r_in[None, :] & k_in[:, None],
                        other=0.0)
            if IEEE:
                acc += tl.dot(x, a, input_precision="ieee")
            else:
                acc += tl.dot(x, a)
        out = out_ptr + split * out_stride_split + rows[:, None] * out_stride_t + offs_r[None, :]
        tl.store(out, acc, mask=mine[:, None] & r_in[None, :])


@triton.jit(do_not_specialize=["num_tokens"])
def _expand_kernel(p_ptr, b_ptr, idx_ptr, order_ptr, y_ptr, num_tokens, N, R, splits,
                   p_stride_split, p_stride_t, b_stride_s, b_stride_r, y_stride,
                   IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    rows, slots, t_in, lo, hi = _tile(idx_ptr, order_ptr, num_tokens, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    for s in range(lo, hi + 1):
        mine = t_in & (slots == s)
        keep = mine[:, None] & r_in[None, :]
        v = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.float32)
        for split in range(0, splits):   # the shrink's partial sums
            v += tl.load(p_ptr + split * p_stride_split + rows[:, None] * p_stride_t + offs_r[None, :],
                         mask=keep, other=0.0)
        b = tl.load(b_ptr + s * b_stride_s + offs_n[None, :] + offs_r[:, None] * b_stride_r,
                    mask=n_in[None, :] & r_in[:, None], other=0.0)
        if IEEE:
            delta = tl.dot(v, b, input_precision="ieee")
        else:
            delta = tl.dot(v.to(b.dtype), b)
        y_ptrs = y_ptr + rows[:, None] * y_stride + offs_n[None, :]
        out_mask = mine[:, None] & n_in[None, :]
        y = tl.load(y_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=out_mask)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def lora_shrink(x: torch.Tensor, a: torch.Tensor, indices: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Partial sums [splits, T, R] (fp32) of x A^T per token; rows of tokens without a slot unset."""
    num_tokens, k = x.shape
    _, r, _ = a.shape
    if x.stride(1) != 1 or a.stride(2) != 1:
        raise ValueError("lora_shrink needs row-major x and A")
    block_k = 64
    # A decode batch is a few tiles: split the reduction so that there are enough programs.
    block_t = _block_t(num_tokens)
    splits = _shrink_splits(num_tokens, k, block_k, x)
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_per_split)
    out = torch.empty(splits, num_tokens, r, dtype=torch.float32, device=x.device)
    if num_tokens:
        grid = (triton.cdiv(num_tokens, block_t), splits)
        _shrink_kernel[grid](x, a, indices, order, out, num_tokens, r, k, k_per_split,
                             x.stride(0), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
                             IEEE=x.dtype == torch.float32, BLOCK_T=block_t, BLOCK_R=_block_r(r), BLOCK_K=block_k)
    return out


def lora_expand(partials: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
    """y[t] += (sum of the partials)[t] @ B[slot(t)] in place (B: [slots, R, N])."""
    splits, num_tokens, r = partials.shape
    _, _, n = b.shape
    if b.stride(2) != 1 or y.stride(1) != 1:
        raise ValueError("lora_expand needs row-major B and y")
    if num_tokens:
        block_n, block_t = 64, _block_t(num_tokens)
        grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(n, block_n))
        _expand_kernel[grid](partials, b, indices, order, y, num_tokens, n, r, splits,
                             partials.stride(0), partials.stride(1), b.stride(0), b.stride(1), y.stride(0),
                             IEEE=b.dtype == torch.float32, BLOCK_T=block_t, BLOCK_N=block_n,
                             BLOCK_R=_block_r(r))
    return y
