"""One step's result while its sampled ids are still on their way to the host.

`ModelRunner.execute_model_async` returns a `StepOutput` as soon as the step is queued on the
device: the sampled ids stay in a device buffer (the next step's decode inputs are gathered from
it on the device) and travel to pinned host memory in a non-blocking copy followed by an event.
`get()` waits for that event only, so the host can schedule and launch the next step first
(vLLM V1's async scheduling). On the CPU everything has already run and `get()` just reads.
"""
from __future__ import annotations

import torch

from pagedray.common.messages import Logprobs, ModelRunnerOutput
from pagedray.workers.sampler import DeviceSample


class StepOutput:
    def __init__(self, req_ids: list[str], sample: DeviceSample | None,
                 prompt_logprobs: dict[str, list[Logprobs]] | None = None) -> None:
        self.req_ids = req_ids
        self.sample = sample
        self.prompt_logprobs = prompt_logprobs or {}
        # Row of each sampling request in `token_ids` (the next step's inputs gather from it).
        self.rows = {rid: i for i, rid in enumerate(req_ids)}
        self._host: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        self._token_list: list[int] | None = None
        self._result: ModelRunnerOutput | None = None
        if sample is not None and sample.token_ids.is_cuda:
            ids = sample.token_ids
            self._host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self._host.copy_(ids, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

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
            if self._event is not None:
                self._event.synchronize()
                self._token_list = self._host.tolist()
            else:
                self._token_list = self.sample.token_ids.tolist()
        return self._token_list

    def get(self) -> ModelRunnerOutput:
        if self._result is None:
            logprobs = {}
            if self.sample.raw_logprobs is not None:
                entries = self.sample.logprobs()
                logprobs = {r: lp for r, lp in zip(self.req_ids, entries) if lp is not None}
            self._result = ModelRunnerOutput(dict(zip(self.req_ids, self.token_list())), logprobs,
                                             self.prompt_logprobs)
            self.sample = DeviceSample(self.sample.token_ids, None, [])   # free the logprobs
        return self._result
