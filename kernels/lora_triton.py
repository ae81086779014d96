"""The batched LoRA matmul in Triton (see lora.py): out[t] (+)= x[t] @ W[slot(t)]^T.

One program per (tile of BLOCK_T tokens in slot order, tile of BLOCK_N outputs, slot). Tokens
arrive sorted by slot (`order`), so a tile holds one or two adapters' tokens; the program of a
slot none of its tokens use returns at once. Its tokens' rows are gathered through `order`, the
product runs on the tensor cores (fp16/bf16; exact fp32 for float32), and only its own slot's
rows are written, so every output row is written by exactly one program (no atomics). Grid and
arguments depend only on the token count and the slot stack: the launch is captured in CUDA
graphs as is, and the indices change in place between replays.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens"])
def _lora_kernel(x_ptr, w_ptr, idx_ptr, order_ptr, out_ptr, num_tokens, N, K,
                 x_stride, w_stride_s, w_stride_n, out_stride,
                 ACCUMULATE: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile, n_tile, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    t_in = offs_t < num_tokens
    rows = tl.load(order_ptr + offs_t, mask=t_in, other=0).to(tl.int64)
    mine = t_in & (tl.load(idx_ptr + rows, mask=t_in, other=-1) == slot)
    if tl.max(mine.to(tl.int32), axis=0) > 0:
        offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        w_base = w_ptr + slot.to(tl.int64) * w_stride_s
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_in = offs_k < K
            x = tl.load(x_ptr + rows[:, None] * x_stride + offs_k[None, :],
                        mask=mine[:, None] & k_in[None, :], other=0.0)
            w = tl.load(w_base + offs_n[None, :] * w_stride_n + offs_k[:, None],
                        mask=n_in[None, :] & k_in[:, None], other=0.0)
            if IEEE:
                acc += tl.dot(x, w, input_precision="ieee")
            else:
                acc += tl.dot(x.to(w.dtype), w)
        out_ptrs = out_ptr + rows[:, None] * out_stride + offs_n[None, :]
        keep = mine[:, None] & n_in[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=keep, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=keep)


def lora_matmul(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
                out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    num_tokens, k = x.shape
    slots, n, _ = weights.shape
    if num_tokens == 0:
        return out
    if x.stride(1) != 1 or weights.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError("lora_matmul needs row-major x, weights and out")
    block_n = max(16, min(64, triton.next_power_of_2(n)))
    block_k = max(16, min(128 if n <= 64 else 32, triton.next_power_of_2(k)))
    grid = (triton.cdiv(num_tokens, 16), triton.cdiv(n, block_n), slots)
    _lora_kernel[grid](x, weights, indices, order, out, num_tokens, n, k,
                       x.stride(0), weights.stride(0), weights.stride(1), out.stride(0),
                       ACCUMULATE=accumulate, IEEE=x.dtype == torch.float32,
                       BLOCK_T=16, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
