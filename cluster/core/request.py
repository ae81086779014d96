"""The driver-side state of one sequence: its tokens, progress and status.

Pure Python (no torch): the scheduler and block manager only read and update these.
"""
from __future__ import annotations

import enum
import time

from pagedray.common.lora import LoRARequest
from pagedray.common.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self._is_finished   # set below: asked per request per step, and enum hashing is slow

    @property
    def finish_reason(self) -> str | None:
        """vLLM's finish_reason string: "stop", "length", "abort", or None while unfinished."""
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}
for _status in RequestStatus:
    _status._is_finished = _status in _FINISH_REASONS


class Request:
    """One sequence: prompt tokens, sampled tokens, and how many tokens have K/V in the cache."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 arrival_time: float | None = None, lora_request: LoRARequest | None = None) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty (0 tokens)")
        if any(not isinstance(t, int) or t < 0 for t in prompt_token_ids):
            raise ValueError("prompt_token_ids must be a list of non-negative integers")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.lora_request = lora_request
        # Prefix-cache keys start from this: an adapter's K/V are never shared with another's.
        self.cache_salt = lora_request.cache_salt() if lora_request is not None else b""
        self.output_token_ids: list[int] = []
        # Tokens (prompt first, then outputs) whose K/V are in this request's cache blocks.
        self.num_computed_tokens = 0
        # Tokens scheduled to be sampled whose ids have not come back yet (overlapped steps: the
        # next step is scheduled before this one's output is read; vLLM V1's placeholders).
        self.num_output_placeholders = 0
        self.status = RequestStatus.WAITING
        # Prefix-cache hit tokens at first admission (usage stats; a resume after preemption does not count).
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        # The stop token id that finished the request, when one did.
        self.stop_reason: int | None = None
        # Speculative decoding: proposals for the tokens after the last one, verified by the next step.
        self.spec_token_ids: list[int] = []
        # Prompt followed by outputs, kept as one list so slices for the workers are cheap. Read it,
        # append through append_output_token(s). (An attribute, not a property: read per request per step.)
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        # The token count at which the request ends by length (set by the scheduler, which knows
        # max_model_len; the sampling params never change once a request is added).
        self.length_limit: int | None = None
        # The token ids that stop it (eos unless ignore_eos, and stop_token_ids; set with length_limit):
        # one set to look a new token up in, empty for most benchmark requests.
        self.stop_ids: frozenset[int] = frozenset()

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> int:
        """Append a sampled token; the token count (prompt + outputs) after it."""
        self.output_token_ids.append(token_id)
        tokens = self.all_token_ids
        tokens.append(token_id)
        return len(tokens)

    def append_output_tokens(self, token_ids: list[int]) -> None:
        """Several at once (a verification's accepted tokens, none of them a stop)."""
        self.output_token_ids += token_ids
        self.all_token_ids += token_ids

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
                f"outputs={self.num_output_tokens}, computed={self.num_computed_tokens}, {self.status.name})")
