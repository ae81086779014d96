"""Executors run one SchedulerOutput on every tensor-parallel rank of a replica."""
from __future__ import annotations

from pagedray.cluster.config import EngineConfig
from pagedray.cluster.executors.base import Executor, ExecutorError


def make_executor(config: EngineConfig) -> Executor:
    if config.parallel.executor == "local":
        from pagedray.cluster.executors.local import LocalExecutor
        return LocalExecutor(config)
    from pagedray.cluster.executors.ray import RayExecutor
    return RayExecutor(config)


__all__ = ["Executor", "ExecutorError", "make_executor"]
