"""Tensor-parallel collectives over the default torch.distributed group.

One model replica owns the whole default group (each Ray worker process of a
replica calls `init_process_group` once), so the TP group *is* the world.
Everything is the identity at world size 1, which is how CPU runs and tests
without a process group behave.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_tp_rank() -> int:
    return dist.get_rank() if _initialized() else 0


def get_tp_world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the TP ranks (in place when there is more than one rank)."""
    if get_tp_world_size() == 1:
        return x
    dist.all_reduce(x)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    world = get_tp_world_size()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=dim)


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division for sharding; `what` names the quantity in the error."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) must be divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator
