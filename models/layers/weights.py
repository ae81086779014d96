"""Helpers shared by every `weight_loader`.

A checkpoint tensor reaches a loader either as a torch.Tensor or as a lazy
safetensors slice (`safe_open(...).get_slice(name)`); the helpers below treat
both alike so that each rank reads only its own shard from disk.
"""
from __future__ import annotations

from typing import Any

import torch

WeightLike = Any  # torch.Tensor or a safetensors PySafeSlice


def shape_of(loaded: WeightLike) -> tuple[int, ...]:
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def narrow(loaded: WeightLike, dim: int, start: int, length: int) -> torch.Tensor:
    """`loaded[..., start:start+length, ...]` along `dim`, read lazily for slices."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, length)
    index = [slice(None)] * len(shape_of(loaded))
    index[dim] = slice(start, start + length)
    return loaded[tuple(index)]


def materialize(loaded: WeightLike) -> torch.Tensor:
    """The whole tensor."""
    if isinstance(loaded, torch.Tensor):
        return loaded
    shape = shape_of(loaded)
    return loaded[tuple(slice(None) for _ in shape)] if shape else loaded[:]


def check_shape(loaded: WeightLike, expected: tuple[int, ...]) -> None:
    got = shape_of(loaded)
    if got != tuple(expected):
        raise ValueError(f"checkpoint shape {got} does not match the expected shape {tuple(expected)}")


def default_weight_loader(param: torch.nn.Parameter, loaded_weight: WeightLike,
                          shard_id: Any = None) -> None:
    """Replicated parameter: copy the whole tensor."""
    if shard_id is not None:
        raise ValueError(f"a replicated parameter takes no shard_id, got {shard_id!r}")
    check_shape(loaded_weight, tuple(param.shape))
    param.data.copy_(materialize(loaded_weight))


def set_weight_loader(param: torch.nn.Parameter, loader) -> torch.nn.Parameter:
    param.weight_loader = loader
    return param
