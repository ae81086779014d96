"""Batched LoRA for a whole step: every token applies its own adapter (or none) in one pass.

A LoRA layer adds y[t] += (x[t] A[s]^T) B[s]^T with s = indices[t], its token's device slot
(-1: none; that row is left untouched), A and B stacked per slot ([slots, R, K], [slots, N, R]).
Two batched calls (SGMV/BGMV style), both indexed per token:
  lora_shrink(x, A, indices, order) -> partial sums [splits, T, R] of x A^T, in fp32
  lora_expand(partials, B, indices, order, y): y += (sum of the partials) B^T, in place
`order` is the tokens sorted by slot (computed once per step on the host), which lets a kernel
tile hold mostly one adapter's tokens. On CUDA with Triton the kernels of `lora_triton.py` run;
elsewhere the PyTorch reference below (the oracle of the kernel tests).
"""
from __future__ import annotations

import functools
import logging

import torch

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
            delta = shrunk.index_select(0, rows) @ b[slot].float().t()
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


def lora_delta(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               indices: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """y[t] += (x[t] @ A[s]^T) @ B[s]^T with s = indices[t], in place (the scale is folded into B)."""
    return lora_expand(lora_shrink(x, lora_a, indices, order), lora_b, indices, order, y)


__all__ = ["lora_shrink", "lora_expand", "lora_delta", "lora_shrink_reference", "lora_expand_reference"]
