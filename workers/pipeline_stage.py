"""One pipeline stage's forward: receive the previous stage's output, run this stage's layers, send
the result on (every stage but the last) — and the time spent waiting on the neighbours, from which
benchmarks read the pipeline bubble.

Each TP rank of stage s talks to the same TP rank of stage s ± 1 (`distributed.pp_send`/`pp_recv`);
the receiver sizes its buffers from the step (one row per scheduled token), so nothing but the
tensors crosses.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pagedray.models.layers.attention import AttentionMetadata
from pagedray.models.layers.distributed import pp_recv, pp_send
from pagedray.models.layers.pipeline import IntermediateTensors, PipelineStage


@dataclass
class StageTimes:
    """Seconds since the last `take`: in steps, and of those blocked on the neighbouring stages.
    On a GPU the transfers are queued, so only the CPU figures mean waiting."""
    step_s: float = 0.0
    recv_wait_s: float = 0.0
    send_wait_s: float = 0.0
    steps: int = 0


class StageIO:
    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.times = StageTimes()

    def buffers(self, num_tokens: int) -> IntermediateTensors:
        return self.model.empty_intermediate_tensors(num_tokens, self.dtype, self.device)

    def forward(self, stage: PipelineStage, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor | None:
        """This stage's part of a step: the hidden states on the last stage, else None (sent on)."""
        t0 = time.perf_counter()
        received = None if stage.is_first else pp_recv(self.buffers(input_ids.shape[0]))
        t1 = time.perf_counter()
        out = self.model(input_ids, positions, kv_caches, meta, received)
        t2 = time.perf_counter()
        if not stage.is_last:
            pp_send(out)
            out = None
        t3 = time.perf_counter()
        times = self.times
        times.step_s += t3 - t0
        times.recv_wait_s += t1 - t0
        times.send_wait_s += t3 - t2
        times.steps += 1
        return out

    def take_times(self) -> StageTimes:
        times, self.times = self.times, StageTimes()
        return times
