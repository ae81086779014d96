"""Rotary position embedding with a precomputed cos/sin cache.

The cache is [max_position, rotary_dim] float32: cos of every (position,
frequency) pair in the first half, sin in the second, already multiplied by
the scaling type's attention factor (YaRN). Scaling types follow the
formulas of HF transformers' `ROPE_INIT_FUNCTIONS`, keyed the way configs
state them (`rope_type`, or the older `type`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedray.kernels import ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_size: int, rotary_dim: int, inv_freq: torch.Tensor, cache_len: int,
                 attention_scaling: float = 1.0, is_neox_style: bool = True) -> None:
        super().__init__()
        self.head_size, self.rotary_dim, self.is_neox_style = head_size, rotary_dim, is_neox_style
        positions = torch.arange(cache_len, dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(positions, inv_freq.float())  # same products as HF's position * inv_freq
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T]; query [T, H*D] or [T, H, D]; key likewise. Returns tensors of the input shapes."""
        num_tokens = positions.shape[0]
        q = query.reshape(num_tokens, -1, self.head_size)
        k = key.reshape(num_tokens, -1, self.head_size)
        q, k = ops.rotary_embedding(positions, q, k, self.cos_sin_cache, self.is_neox_style)
        return q.reshape(query.shape), k.reshape(key.shape)

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, "
                f"max_position={self.cos_sin_cache.shape[0]}, neox={self.is_neox_style}")


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _require(scaling: dict, key: str, rope_type: str) -> Any:
    if scaling.get(key) is None:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs {key!r}, got {scaling}")
    return scaling[key]


def _linear(base: float, dim: int, max_position: int, scaling: dict) -> tuple[torch.Tensor, float, int]:
    factor = float(_require(scaling, "factor", "linear"))
    return _default_inv_freq(base, dim) / factor, 1.0, max(max_position, math.ceil(max_position * factor))


def _dynamic(base: float, dim: int, max_position: int, scaling: dict) -> tuple[torch.Tensor, float, int]:
    # HF rescales the base only once a sequence grows past max_position_embeddings;
    # positions are capped below it here (max_model_len <= max_position), so the
    # frequencies are the default ones and the cache stops at max_position.
    _require(scaling, "factor", "dynamic")
    return _default_inv_freq(base, dim), 1.0, max_position


def _llama3(base: float, dim: int, max_position: int, scaling: dict) -> tuple[torch.Tensor, float, int]:
    factor = float(_require(scaling, "factor", "llama3"))
    low_ff = float(_require(scaling, "low_freq_factor", "llama3"))
    high_ff = float(_require(scaling, "high_freq_factor", "llama3"))
    old_len = scaling.get("original_max_position_embeddings") or max_position
    inv_freq = _default_inv_freq(base, dim)
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > old_len / low_ff, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / high_ff) & (wavelen <= old_len / low_ff)
    return torch.where(in_band, smoothed, scaled), 1.0, max_position


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(base: float, dim: int, max_position: int, scaling: dict) -> tuple[torch.Tensor, float, int]:
    old_len = scaling.get("original_max_position_embeddings") or max_position
    factor = float(scaling.get("factor") or max_position / old_len)
    attn_factor = scaling.get("attention_factor")
    if attn_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                       if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = _default_inv_freq(base, dim)
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, float(attn_factor), max(max_position, math.ceil(old_len * factor))


_ROPE_FNS = {"linear": _linear, "dynamic": _dynamic, "llama3": _llama3, "yarn": _yarn}
_ROPE_CACHE: dict[tuple, RotaryEmbedding] = {}


def get_rope(head_size: int, rotary_dim: int, max_position: int, base: float, is_neox_style: bool = True,
             rope_scaling: dict | None = None) -> RotaryEmbedding:
    """One shared module per distinct setting (and default dtype/device): layers reuse its cache."""
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    if rotary_dim > head_size or rotary_dim % 2:
        raise ValueError(f"rotary_dim ({rotary_dim}) must be even and <= head_size ({head_size})")
    key = (head_size, rotary_dim, max_position, float(base), is_neox_style, rope_type,
           repr(sorted(scaling.items())), str(torch.get_default_device()))
    if key not in _ROPE_CACHE:
        if rope_type == "default":
            inv_freq, attn_factor, cache_len = _default_inv_freq(base, rotary_dim), 1.0, max_position
        else:
            inv_freq, attn_factor, cache_len = _ROPE_FNS[rope_type](float(base), rotary_dim, max_position, scaling)
        _ROPE_CACHE[key] = RotaryEmbedding(head_size, rotary_dim, inv_freq.to(torch.get_default_device()),
                                           cache_len, attn_factor, is_neox_style)
    return _ROPE_CACHE[key]


def rope_config(hf_config: Any) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a HF config of either shape.

    transformers >= 5 keeps both in `config.rope_parameters` (theta as
    `rope_theta` inside); older versions have `config.rope_theta` and
    `config.rope_scaling` (None when unscaled). Per-layer-type nested
    parameters (Gemma 3 style) are not handled here.
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), params
    base = getattr(hf_config, "rope_theta", None) or 10000.0
    return float(base), getattr(hf_config, "rope_scaling", None)


def partial_rotary_dim(hf_config: Any, head_size: int) -> int:
    """Channels of each head that rotate: head_size * the config's partial rotary factor.

    transformers >= 5 keeps the factor in `rope_parameters["partial_rotary_factor"]`;
    older configs state `partial_rotary_factor` or (GPT-NeoX) `rotary_pct`. No factor: all.
    """
    params = getattr(hf_config, "rope_parameters", None)
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    for name in ("partial_rotary_factor", "rotary_pct"):
        if factor is None:
            factor = getattr(hf_config, name, None)
    factor = 1.0 if factor is None else float(factor)
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"partial_rotary_factor must be in (0, 1], got {factor}")
    return int(head_size * factor)
