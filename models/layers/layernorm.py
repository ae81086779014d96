"""Normalization layers. RMSNorm runs the fused residual-add kernel when given a residual."""
from __future__ import annotations

import torch
from torch import nn

from pagedray.kernels import ops

LayerNorm = nn.LayerNorm  # replicated on every rank, PyTorch's kernel is fine


class RMSNorm(nn.Module):
    """x / rms(x) * w, computed in float32.

    forward(x) -> normed; forward(x, residual) -> (normed(x + residual), x + residual),
    the pre-norm residual stream of Llama-style decoders in one fused op.
    `unit_offset=True` scales by (1 + w) instead (Gemma), in float32 like HF.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(hidden_size) if unit_offset else torch.ones(hidden_size),
                                   requires_grad=False)

    def _scale(self) -> torch.Tensor:
        return self.weight.float() + 1.0 if self.unit_offset else self.weight

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return ops.rms_norm(x, self._scale(), self.eps)
        return ops.fused_add_rms_norm(x, residual, self._scale(), self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"


class GemmaRMSNorm(RMSNorm):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__(hidden_size, eps, unit_offset=True)
