"""Typed messages between the driver (scheduler/engine) and the workers.

Plain Python dataclasses, no torch: they cross process boundaries (Ray) as-is.
A request travels whole the first step it is scheduled (`NewRequestData`) and
as a delta afterwards (`CachedRequestData`); workers keep per-request state.
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
    """A running request the workers already hold: only what changed."""
    req_id: str
    # Tokens sampled since the request was last scheduled (appended by the driver).
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int
    # Set when the driver cut the request's block table (speculative decoding gave back the blocks
    # of rejected proposals): `new_block_ids` replace the table from this index. None: appended.
    block_start: int | None = None


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
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
