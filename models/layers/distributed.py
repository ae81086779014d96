"""Tensor- and pipeline-parallel collectives over torch.distributed.

One model replica owns the whole default group (each Ray worker process of a replica calls
`init_process_group` once, world size tp × pp). Ranks are stage-major: rank = stage * tp + tp_rank.
Without pipeline parallelism the TP group *is* the world (the default group); with it,
`init_model_parallel` makes one TP subgroup per stage, and hidden states pass from a rank to the
same TP rank of the next stage by point-to-point send/recv on the default group.

Everything is the identity at world size 1, which is how CPU runs and tests without a process
group behave.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class _ModelParallel:
    tp_size: int
    pp_size: int
    tp_group: Any = None   # None: the default group (pp == 1)


_STATE: _ModelParallel | None = None   # set by init_model_parallel; None: TP over the whole world


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_model_parallel(tp_size: int, pp_size: int) -> None:
    """Split the initialised world (tp × pp ranks, stage-major) into one TP group per stage.
    Every rank must call it (group creation is collective)."""
    global _STATE
    world = dist.get_world_size() if _initialized() else 1
    if world != tp_size * pp_size:
        raise ValueError(f"the process group has {world} ranks, not tensor_parallel_size ({tp_size}) x "
                         f"pipeline_parallel_size ({pp_size})")
    state = _ModelParallel(tp_size, pp_size)
    if pp_size > 1 and tp_size > 1:
        rank = dist.get_rank()
        for stage in range(pp_size):
            group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
            if rank // tp_size == stage:
                state.tp_group = group
    _STATE = state


def reset_model_parallel() -> None:
    global _STATE
    _STATE = None


def get_tp_world_size() -> int:
    if _STATE is not None:
        return _STATE.tp_size
    return dist.get_world_size() if _initialized() else 1


def get_tp_rank() -> int:
    if not _initialized():
        return 0
    return dist.get_rank() % get_tp_world_size()


def get_pp_world_size() -> int:
    return _STATE.pp_size if _STATE is not None else 1


def get_pp_rank() -> int:
    if _STATE is None or _STATE.pp_size == 1:
        return 0
    return dist.get_rank() // _STATE.tp_size


def _tp_group():
    return _STATE.tp_group if _STATE is not None else None


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the TP ranks (in place when there is more than one rank)."""
    if get_tp_world_size() == 1:
        return x
    dist.all_reduce(x, group=_tp_group())
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim`, in rank order."""
    world = get_tp_world_size()
    if world == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=_tp_group())
    return torch.cat(parts, dim=dim)


def tp_broadcast(x: torch.Tensor) -> torch.Tensor:
    """Overwrite `x` on every TP rank with TP rank 0's (in place), e.g. the sampling rank's result."""
    if get_tp_world_size() == 1:
        return x
    dist.broadcast(x, dist.get_rank() - get_tp_rank(), group=_tp_group())
    return x


def pp_send(tensors: dict[str, torch.Tensor]) -> None:
    """Send a stage's output to the same TP rank of the next stage (in name order)."""
    dst = dist.get_rank() + get_tp_world_size()
    for name in sorted(tensors):
        dist.send(tensors[name].contiguous(), dst)


def pp_recv(buffers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill `buffers` (sized by the receiver) from the same TP rank of the previous stage."""
    src = dist.get_rank() - get_tp_world_size()
    for name in sorted(buffers):
        dist.recv(buffers[name], src)
    return buffers


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division for sharding; `what` names the quantity in the error."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) must be divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator
