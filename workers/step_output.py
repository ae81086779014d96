"""One step's result while its sampled ids are still on their way to the host.

`ModelRunner.execute_model_async` returns a `StepOutput` as soon as the step is queued on the
device: the sampled ids stay in a device buffer (the next step's decode inputs are gathered from
it on the device) and travel to pinned host memory in a non-blocking copy followed by an event.
`get()` waits for that event only, so the host can schedule and launch the next step first
(vLLM V1's async scheduling). On the CPU everything has already run and `get()` just reads.
"""
from __future__ import annotations

import time

import torch

from pagedray.common.messages import Logprobs, ModelRunnerOutput
from pagedray.workers.sampler import DeviceSample


class HostCopy:
    """A device tensor on its way to pinned host memory: a non-blocking copy queued now, behind an
    event, so `tolist()` waits for the work queued before the copy only, not for what was queued
    since (the next step's forward). A CPU tensor is read as it is."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._tensor, self._event = tensor, None
        if tensor.is_cuda:
            self._tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._tensor.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def tolist(self) -> list:
        if self._event is not None:
            self._event.synchronize()
        return self._tensor.tolist()


class StepTimer:
    """A step's time for the scheduler's prefill pacing. On CUDA, timing events around the step's
    device work: the start marker runs when the device reaches this step (the previous step's end,
    or now if it idles), so the span includes launch gaps inside the step, as its running streams
    feel it. On the CPU, the wall time (the step runs synchronously)."""

    def __init__(self, device: torch.device) -> None:
        self._start = self._end = None
        self._seconds: float | None = None
        if device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()
        else:
            self._seconds = time.perf_counter() - self._t0

    def seconds(self) -> float | None:
        """After stop(); on CUDA, waits for the end marker (callers read it after the step's samples)."""
        if self._end is not None and self._seconds is None:
            self._end.synchronize()
            self._seconds = self._start.elapsed_time(self._end) / 1000.0
        return self._seconds


class StepOutput:
    def __init__(self, req_ids: list[str], sample: DeviceSample | None,
                 prompt_logprobs: dict[str, list[Logprobs]] | None = None, timer: StepTimer | None = None) -> None:
        self.req_ids = req_ids
        self.timer = timer
        if timer is not None:
            timer.stop()   # before the copy's event: get() finds the step's end already passed
        self.sample = sample
        self.prompt_logprobs = prompt_logprobs or {}
        # Row of each sampling request in `token_ids` (the next step's inputs gather from it).
        self.rows = dict(zip(req_ids, range(len(req_ids))))
        self._token_list: list[int] | None = None
        self._result: ModelRunnerOutput | None = None
        self._host = HostCopy(sample.token_ids) if sample is not None else None

    @classmethod
    def done(cls, output: ModelRunnerOutput) -> "StepOutput":
        step = cls([], None)
        step._result = output
        return step

    @property
    def token_ids(self) -> torch.Tensor:
        """The sampled ids on the device, one per sampling request in `req_ids` order."""
        return self.sample.token_ids

    def token_list(self) -> list[int]:
        """The sampled ids on the host (waits for the copy)."""
        if self._token_list is None:
            self._token_list = self._host.tolist()
        return self._token_list

    def get(self) -> ModelRunnerOutput:
        if self._result is None:
            logprobs = {}
            if self.sample.raw_logprobs is not None:
                entries = self.sample.logprobs()
                logprobs = {r: lp for r, lp in zip(self.req_ids, entries) if lp is not None}
            self._result = ModelRunnerOutput(dict(zip(self.req_ids, self.token_list())), logprobs,
                                             self.prompt_logprobs,
                                             step_time_s=self.timer.seconds() if self.timer is not None else None)
            self.sample = DeviceSample(self.sample.token_ids, None, [])   # free the logprobs
        return self._result
