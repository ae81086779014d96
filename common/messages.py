"""Typed messages between the driver (scheduler/engine) and the workers.

Plain Python dataclasses, no torch: they cross process boundaries (Ray) as-is.
A request travels whole the first step it is scheduled (`NewRequestData`) and
as a delta afterwards (a row of `CachedRequestData`); workers keep per-request state.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pagedray.common.lora import LoRARequest
from pagedray.common.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the workers have not seen (or that was preempted and resumes)."""
    req_id: str
    # Every token known so far: the prompt, plus the outputs of a preempted request.
    token_ids: list[int]
    # Length of the original prompt (tokens past it are outputs, for penalties).
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    # Tokens whose K/V are already in the cache (prefix-cache hits).
    num_computed_tokens: int
    lora_request: LoRARequest | None = None   # the adapter it runs with (None: the base model)


@dataclass
class CachedRequestData:
    """The running requests the workers already hold, one list a field (vLLM V1's layout): only what
    changed since each was last sent. Columns, not one object a request: at batch ~1000 a decode step
    builds and applies this for every running request, and per-request objects were a large part of
    the step's host work (docs/perf-notes/history.md)."""
    req_ids: list[str] = field(default_factory=list)
    # Tokens sampled since the request was last scheduled (appended by the driver).
    new_token_ids: list[list[int]] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    # Requests whose block table the driver cut (speculative decoding gave back the blocks of rejected
    # proposals): req_id -> the index from which its new_block_ids replace the table. Others: appended.
    block_starts: dict[str, int] = field(default_factory=dict)

    def append(self, req_id: str, new_token_ids: list[int], new_block_ids: list[int], num_computed_tokens: int,
               block_start: int | None = None) -> None:
        self.req_ids.append(req_id)
        self.new_token_ids.append(new_token_ids)
        self.new_block_ids.append(new_block_ids)
        self.num_computed_tokens.append(num_computed_tokens)
        if block_start is not None:
            self.block_starts[req_id] = block_start


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    # req_id -> number of tokens to run this step (prefill chunk or 1 for decode).
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # Requests that ended or were preempted since the last step: workers drop their state.
    finished_req_ids: set[str] = field(default_factory=set)
    # Copy-on-write block copies to do before the forward: (src, dst) pairs.
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    # Speculative decoding: req_id -> the proposals it verifies this step (counted in its
    # num_scheduled_tokens after its one known token).
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Speculation backed off (cluster/core/spec_backoff.py): requests whose next step certainly
    # verifies nothing, so the workers' proposer need not draft for them in this step.
    spec_skip_draft_req_ids: set[str] = field(default_factory=set)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


# One step's logprobs for one request: the sampled token first, then the top-N.
# Each entry: (token_id, logprob, rank) where rank is 1-based among the vocabulary.
Logprobs = list[tuple[int, float, int]]


@dataclass
class ModelRunnerOutput:
    # Only requests that reached the end of their known tokens produce a sample;
    # a request in the middle of a chunked prefill is absent.
    sampled_token_ids: dict[str, int]
    logprobs: dict[str, Logprobs] = field(default_factory=dict)
    # req_id -> per prompt position (from the 2nd token) logprobs, for prompt_logprobs.
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)
    # Speculative decoding. A request that verified proposals: every token of the step (the accepted
    # proposals, then the target's own; `sampled_token_ids` holds the first), and their logprobs.
    accepted_token_ids: dict[str, list[int]] = field(default_factory=dict)
    accepted_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)
    # Proposals of the workers' draft model / EAGLE head for each request's next step.
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # The step's time on the device (from the previous step's end to this one's samples; on the CPU,
    # its wall time), for the scheduler's prefill pacing; None when the runner did not time it.
    step_time_s: float | None = None
