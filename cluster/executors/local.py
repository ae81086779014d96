"""The embedded executor: one Worker in this process (CPU or one GPU)."""
from __future__ import annotations

from pagedray.cluster.config import EngineConfig
from pagedray.cluster.executors.base import Executor, check_num_kv_blocks
from pagedray.common.messages import ModelRunnerOutput, SchedulerOutput
from pagedray.workers.step_output import StepOutput
from pagedray.workers.worker import Worker


class LocalExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        self.worker = Worker(config.model, config.cache, config.parallel, config.device,
                             config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs,
                             kernel_options=config.kernel, speculative_config=config.speculative,
                             lora_config=config.lora)
        self.worker.init_device()
        self.worker.load_model()
        num_blocks = self.worker.num_kv_blocks()
        check_num_kv_blocks(num_blocks, config.cache, self.worker.kv_budget_detail)
        self.num_kv_blocks = num_blocks
        self.worker.initialize_cache(num_blocks)
        self.worker.capture_graphs()
        if config.speculative is not None and config.scheduler.async_scheduling:
            # Steps overlap: the driver schedules with placeholders for this worker's own proposals.
            self.worker.runner.spec.overlapped = True

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(sched)

    def execute_model_async(self, sched: SchedulerOutput) -> StepOutput:
        return self.worker.runner.execute_model_async(sched)

    def add_lora(self, lora_request) -> bool:
        return self.worker.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.worker.remove_lora(lora_int_id)

    def shutdown(self) -> None:
        self.worker.shutdown()
