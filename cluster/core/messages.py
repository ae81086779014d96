"""What crosses the boundary between the serving front and an engine core. Pure Python.

Requests go down whole (`CoreRequest`), aborts as ids; every engine step comes back as one
`CoreOutputs` batch of deltas for all of that core's requests. These are msgspec structs
(`array_like`: encoded as arrays, not maps) so a batch of hundreds of deltas encodes in one call.
"""
from __future__ import annotations

import msgspec

from pagedray.common.lora import LoRARequest
from pagedray.common.sampling_params import SamplingParams


class CoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request for the core: validated and tokenized by the front."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    # Tokens this request already produced elsewhere (a migrated request): the core continues
    # from prompt + these, at output position len(output_token_ids), as after a preemption.
    output_token_ids: list[int] = []
    arrival_time: float = 0.0
    lora_request: LoRARequest | None = None   # the adapter to run with (None: the base model)
    # The front reads only the finished request (vLLM's FINAL_ONLY output kind; LLM.generate): after
    # each completion's first output (its first token, for TTFT) the core sends it nothing until it
    # finishes, then every token since at once. The front asks for it only where it needs no text
    # per step (no stop strings) and no logprobs.
    final_only: bool = False


def completion_id(request_id: str, index: int) -> str:
    """The core's id of completion `index` of an n > 1 request: `abort` takes it to stop that
    completion alone, and a migrated completion is resumed under it (as an n == 1 request)."""
    return f"{request_id}#{index}"


class CoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one completion of one request gained in one step."""
    request_id: str
    index: int                                   # completion index (0..n-1)
    new_token_ids: list[int]
    # Per new token: [(token_id, logprob, rank), ...] sampled token first, then the top-N.
    new_logprobs: list[list[tuple[int, float, int]]] | None = None
    finish_reason: str | None = None             # "stop" | "length" | "abort"
    stop_reason: int | None = None               # the stop token id that ended it, if one did
    # Set (with finish_reason "abort") when the core refused the request: the front's ValueError text.
    error: str | None = None
    # Sent once, with the request's first output: prefix-cache hits and prompt logprobs.
    num_cached_tokens: int = 0
    prompt_logprobs: list[list[tuple[int, float, int]] | None] | None = None


class EngineStats(msgspec.Struct, omit_defaults=True):
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_used_blocks: int = 0
    prefix_cache_hit_rate: float = 0.0
    prefix_cache_hit_tokens: int = 0
    num_preemptions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    # Speculative decoding (vLLM's spec_decode counters): verification steps with proposals,
    # proposals, accepted proposals, and accepted ones per proposal position.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: list[int] = []
    # Request-steps run without proposals because the request's speculation was backed off.
    spec_num_backed_off_steps: int = 0


class CoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """One engine step's deltas for every request that advanced or finished."""
    outputs: list[CoreOutput] = []
    stats: EngineStats | None = None
    timestamp: float = 0.0


class EngineInfo(msgspec.Struct, omit_defaults=True):
    """What the front needs to know about a core once it is up."""
    model: str                      # checkpoint folder (the front loads its tokenizer from it)
    tokenizer: str
    architecture: str
    max_model_len: int
    vocab_size: int
    block_size: int
    num_kv_blocks: int
    tensor_parallel_size: int
    eos_token_ids: list[int] = []
    max_num_seqs: int = 0           # the scheduler's batch seats (0: not told)
    max_lora_rank: int = 0          # 0: LoRA off (the engine was started without enable_lora)


def _add(values):
    """Numbers add up; lists (per-position counters) add up element-wise."""
    values = list(values)
    if values and isinstance(values[0], list):
        width = max(len(v) for v in values)
        return [sum(v[i] for v in values if i < len(v)) for i in range(width)]
    return sum(values)


def sum_stats(stats: list[EngineStats]) -> EngineStats:
    """Several cores' stats as one: counts add up, the hit rate is weighted by prompt tokens."""
    if len(stats) == 1:
        return stats[0]
    total = EngineStats(**{f: _add(getattr(s, f) for s in stats) for f in EngineStats.__struct_fields__})
    weights = total.prompt_tokens_total
    total.prefix_cache_hit_rate = (sum(s.prefix_cache_hit_rate * s.prompt_tokens_total for s in stats) / weights
                                   if weights else 0.0)
    return total
