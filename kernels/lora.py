"""Batched LoRA for a whole step: every token applies its own adapter (or none) in one pass.

`lora_matmul(x, weights, indices, order, out, accumulate)` computes, for each token t with
indices[t] >= 0, out[t] (+)= x[t] @ weights[indices[t]]^T, with `weights` stacked per device slot
[slots, N, K]. A LoRA layer calls it twice (SGMV/BGMV style): shrink with the A stack into the
rank space, expand with the B stack back into the layer's output. `order` is the tokens sorted by
slot (computed once per step on the host), so a kernel tile mostly holds one adapter's tokens.

On CUDA with Triton the kernel in `lora_triton.py` runs; elsewhere the PyTorch reference below.
Both leave rows of tokens without an adapter untouched (not zeroed).
"""
from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)


def lora_matmul_reference(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                          out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    """The oracle: one matmul per slot over that slot's tokens (data-dependent shapes: CPU/eager only)."""
    for slot in range(weights.shape[0]):
        rows = (indices == slot).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        delta = (x.index_select(0, rows).float() @ weights[slot].float().t())
        if accumulate:
            delta += out.index_select(0, rows).float()
        out.index_copy_(0, rows, delta.to(out.dtype))
    return out


@functools.cache
def _triton():
    try:
        from pagedray.kernels import lora_triton
    except ImportError as exc:
        logger.warning("Triton is not installed (%s): LoRA runs its PyTorch reference on the GPU "
                       "(slower, and no CUDA graphs for steps with adapters)", exc)
        return None
    return lora_triton


def triton_available() -> bool:
    return torch.cuda.is_available() and _triton() is not None


def lora_matmul(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, order: torch.Tensor,
                out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    if x.is_cuda and _triton() is not None:
        return _triton().lora_matmul(x, weights, indices, order, out, accumulate)
    return lora_matmul_reference(x, weights, indices, out, accumulate)


def lora_delta(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               indices: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """y[t] += (x[t] @ A[s]^T) @ B[s]^T with s = indices[t] (in place; tokens with s < 0 unchanged).

    The scale (lora_alpha / r) is folded into B when an adapter is loaded into a slot.
    """
    shrunk = torch.empty(x.shape[0], lora_a.shape[1], dtype=torch.float32 if x.dtype == torch.float32
                         else x.dtype, device=x.device)
    lora_matmul(x, lora_a, indices, order, shrunk, accumulate=False)
    return lora_matmul(shrunk, lora_b, indices, order, y, accumulate=True)


__all__ = ["lora_matmul", "lora_matmul_reference", "lora_delta", "triton_available"]
