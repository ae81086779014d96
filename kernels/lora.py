"""Batched LoRA for a whole step: every token applies its own adapter (or none) in one pass.

A LoRA layer adds y[t] += (x[t] A[s]^T) B[s] with s = indices[t], its token's device slot
(-1: none; that row is left untouched), A and B stacked per slot ([slots, R, K], [slots, R, N]:
B is stored transposed, each slot's rows of R contiguous, so that all slots together are one
[slots * R, N] matrix). Two ways, chosen per forward by its token count:
- Per-token kernels (SGMV/BGMV style), for few tokens: each token reads only its own slot.
    lora_shrink(x, A, indices, order) -> partial sums [splits, T, R] of x A^T, in fp32
    lora_expand(partials, B, indices, order, y): y += (sum of the partials) B, in place
  `order` is the tokens sorted by slot (computed once per step on the host), which lets a kernel
  tile hold mostly one adapter's tokens. On CUDA with Triton the kernels of `lora_triton.py` run;
  elsewhere the PyTorch reference below (the oracle of the kernel tests).
- Dense over all slots, for more tokens: x times every slot's A in one GEMM, the columns of slots
  other than the token's zeroed by the step's one-hot `mask` [T, slots], then one GEMM with every
  slot's B (`lora_delta_dense` adds it to a layer's output; `lora_linear_dense` writes it first
  and lets the base layer's GEMM accumulate onto it). It does `slots` times the LoRA FLOPs, in
  three cuBLAS launches; measured faster than the per-token kernels from 2 tokens on, but for
  layers whose output is narrower than twice their input at a few hundred tokens, where the
  kernels' two launches win (`lora_path`: KernelOptions; benchmarks/lora_kernels.py).
"""
from __future__ import annotations

import functools
import logging

import torch

from pagedray.kernels import options

logger = logging.getLogger(__name__)


def lora_shrink_reference(x: torch.Tensor, a: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[1, T, R] fp32; one matmul per slot over that slot's tokens (data-dependent shapes: eager only)."""
    out = torch.zeros(1, x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    for slot in range(a.shape[0]):
        rows = (indices == slot).nonzero().squeeze(1)
        if rows.numel():
            out[0].index_copy_(0, rows, x.index_select(0, rows).float() @ a[slot].float().t())
    return out


def lora_expand_reference(partials: torch.Tensor, b: torch.Tensor, indices: torch.Tensor,
                          y: torch.Tensor) -> torch.Tensor:
    shrunk = partials.sum(0)
    for slot in range(b.shape[0]):
        rows = (indices == slot).nonzero().squeeze(1)
        if rows.numel():
            delta = shrunk.index_select(0, rows) @ b[slot].float()
            y.index_copy_(0, rows, (y.index_select(0, rows).float() + delta).to(y.dtype))
    return y


@functools.cache
def _triton():
    try:
        from pagedray.kernels import lora_triton
    except ImportError as exc:
        logger.warning("Triton is not installed (%s): LoRA runs its PyTorch reference on the GPU "
                       "(slower; steps with adapters cannot replay CUDA graphs)", exc)
        return None
    return lora_triton


def lora_shrink(x: torch.Tensor, a: torch.Tensor, indices: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    if x.is_cuda and _triton() is not None:
        return _triton().lora_shrink(x, a, indices, order)
    return lora_shrink_reference(x, a, indices)


def lora_expand(partials: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
    if y.is_cuda and _triton() is not None:
        return _triton().lora_expand(partials, b, indices, order, y)
    return lora_expand_reference(partials, b, indices, y)


def _masked_shrink(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x A_all^T) * mask, [T, slots * R]: each token's own slot's columns, the others zero."""
    slots, r, k = lora_a.shape
    tokens = x.shape[0]
    if mask.shape != (tokens, slots) or lora_b.shape[:2] != (slots, r):
        raise ValueError(f"LoRA dense path: x {tuple(x.shape)}, A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} "
                         f"and mask {tuple(mask.shape)} do not fit together")
    shrunk = torch.mm(x, lora_a.view(slots * r, k).t())
    shrunk.view(tokens, slots, r).mul_(mask.unsqueeze(2))
    return shrunk


def lora_delta_dense(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """y += ((x A_all^T) * mask) B_all in place: every slot at once, `mask` [T, slots] one-hot per token
    (a row of zeros: no adapter). The product x A^T is rounded to y's dtype, as PEFT's layers do."""
    slots, r, n = lora_b.shape
    if y.shape != (x.shape[0], n):
        raise ValueError(f"LoRA dense path: y {tuple(y.shape)} is not [{x.shape[0]}, {n}]")
    shrunk = _masked_shrink(x, lora_a, lora_b, mask)
    return y.addmm_(shrunk, lora_b.view(slots * r, n))


def lora_linear_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x W^T + bias + the LoRA deltas, the delta first: the base GEMM then accumulates onto it in its
    epilogue (beta=1), so the output is written by the delta's GEMM and read once by the base's, and
    has no read-modify-write of its own (the cost of `lora_delta_dense` after the layer at many tokens)."""
    shrunk = _masked_shrink(x, lora_a, lora_b, mask)
    slots, r, n = lora_b.shape
    stacked_b = lora_b.view(slots * r, n)
    out = torch.mm(shrunk, stacked_b) if bias is None else torch.addmm(bias, shrunk, stacked_b)
    return out.addmm_(x, weight.t())


def lora_path(tokens: int, in_features: int, out_features: int, quantized: bool = False) -> str:
    """How a LoRA layer [in_features -> out_features] adds the deltas of a forward of `tokens`:
    "kernels" (per token), "dense" (`lora_delta_dense` after the layer) or "fused"
    (`lora_linear_dense`), from the kernel options and the layer's shape. Measured on an H100
    (benchmarks/lora_kernels.py): fused beats dense where the output is at least as wide as the input,
    but a base GEMM accumulating into its output (beta=1) with a long reduction and a narrow output
    (down: 14336 -> 4096) ran 5x slower at 4096 tokens; quantized layers have their own product."""
    opts = options.current()
    if tokens < opts.lora_dense_min_tokens:
        return "kernels"
    if out_features < 2 * in_features and \
            opts.lora_narrow_kernels_min_tokens <= tokens < opts.lora_narrow_kernels_max_tokens:
        return "kernels"
    return "fused" if out_features >= in_features and not quantized else "dense"


def lora_delta(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               indices: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """y[t] += (x[t] @ A[s]^T) @ B[s] with s = indices[t], in place (the scale is folded into B): the
    per-token kernels."""
    return lora_expand(lora_shrink(x, lora_a, indices, order), lora_b, indices, order, y)


__all__ = ["lora_shrink", "lora_expand", "lora_delta", "lora_delta_dense", "lora_linear_dense", "lora_path",
           "lora_shrink_reference", "lora_expand_reference"]
