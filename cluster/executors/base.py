from __future__ import annotations

import abc

from pagedray.common.config import CacheConfig
from pagedray.common.messages import ModelRunnerOutput, SchedulerOutput
from pagedray.workers.step_output import StepOutput


def check_num_kv_blocks(num_blocks: int, cache_config: CacheConfig, detail: str = "") -> None:
    """ValueError when profiling left no block for the KV cache (`detail` is added to the message)."""
    if num_blocks < 1:
        raise ValueError(f"no memory left for the KV cache at gpu_memory_utilization="
                         f"{cache_config.gpu_memory_utilization}{detail}: raise it or lower "
                         f"max_num_batched_tokens")


class ExecutorError(RuntimeError):
    """A worker failed (died, OOM, collective error): the replica cannot go on."""


class Executor(abc.ABC):
    """Owns the workers of one replica and drives them in lock-step."""

    num_kv_blocks: int

    @abc.abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput: ...

    def execute_model_async(self, sched: SchedulerOutput) -> StepOutput:
        """Queue the step and return before its sampled ids are read (`StepOutput.get()` waits).
        Executors that cannot overlap run it whole."""
        return StepOutput.done(self.execute_model(sched))

    def add_lora(self, lora_request) -> bool:
        """Parse a LoRA adapter on every worker (ValueError if it does not fit); False if known."""
        raise ValueError(f"{type(self).__name__} does not serve LoRA adapters")

    def remove_lora(self, lora_int_id: int) -> bool:
        return False

    def check_health(self) -> None:
        """Raise ExecutorError when a worker is gone."""

    def shutdown(self) -> None:
        """Release workers and devices; idempotent."""
