from __future__ import annotations

import abc

from pagedray.workers.messages import ModelRunnerOutput, SchedulerOutput


class ExecutorError(RuntimeError):
    """A worker failed (died, OOM, collective error): the replica cannot go on."""


class Executor(abc.ABC):
    """Owns the workers of one replica and drives them in lock-step."""

    num_kv_blocks: int

    @abc.abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...

    def check_health(self) -> None:
        """Raise ExecutorError when a worker is gone."""

    def shutdown(self) -> None:
        """Release workers and devices; idempotent."""
