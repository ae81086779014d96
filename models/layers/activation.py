"""Activations. The gated `*AndMul` forms take [.., 2*d] (gate then up) and return [.., d]."""
from __future__ import annotations

import torch
from torch import nn

from pagedray.kernels import ops


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(x)


class GeluAndMul(nn.Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_and_mul(x, self.approximate)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# HF `hidden_act` names -> elementwise activation factories.
_ACTIVATIONS = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "quick_gelu": QuickGELU,
}

# HF `hidden_act` names -> fused gate activations for gated MLPs.
_GATED = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu": lambda: GeluAndMul("none"),
    "gelu_new": lambda: GeluAndMul("tanh"),
    "gelu_fast": lambda: GeluAndMul("tanh"),
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
}


def get_act_fn(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def get_act_and_mul_fn(name: str) -> nn.Module:
    """act(gate) * up for gated MLPs (Llama's SwiGLU, Gemma's GeGLU)."""
    if name not in _GATED:
        raise ValueError(f"gated activation {name!r} is not supported; supported: {sorted(_GATED)}")
    return _GATED[name]()
