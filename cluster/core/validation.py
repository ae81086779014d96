"""The request checks the front applies before any work (a ValueError for the caller) and the
engine core applies again on what it receives (a refusal: an "abort" output carrying the text).

Pure Python. One place for the limits, so the front and the core can never disagree.
"""
from __future__ import annotations

from pagedray.cluster.core.block_manager import check_fits_kv_cache
from pagedray.cluster.core.messages import EngineInfo
from pagedray.common.sampling_params import SamplingParams


def apply_defaults(params: SamplingParams, num_prompt_tokens: int, max_model_len: int,
                   eos_token_ids: list[int]) -> None:
    """Fill what the caller left to the engine (idempotent): max_tokens up to max_model_len, eos ids."""
    if params.max_tokens is None:
        params.max_tokens = max(0, max_model_len - num_prompt_tokens)
    if eos_token_ids and params.eos_token_id is None:
        params.eos_token_id = eos_token_ids[0]
        if not params.ignore_eos:
            extra = [t for t in eos_token_ids[1:] if t not in params.stop_token_ids]
            params.stop_token_ids = params.stop_token_ids + extra


def check_request(prompt_token_ids: list[int], params: SamplingParams, info: EngineInfo,
                  num_output_tokens: int = 0) -> None:
    """ValueError naming the field and the limit when the request could never run to its end."""
    vocab, max_len = info.vocab_size, info.max_model_len
    n = len(prompt_token_ids)
    if not n:
        raise ValueError("prompt must not be empty (0 tokens)")
    low, high = min(prompt_token_ids), max(prompt_token_ids)
    if low < 0 or high >= vocab:
        raise ValueError(f"prompt_token_ids holds token id {low if low < 0 else high} outside the vocabulary "
                         f"[0, {vocab})")
    if n >= max_len:
        raise ValueError(f"prompt has {n} tokens: it must be shorter than max_model_len={max_len} to leave "
                         "room for output")
    if params.max_tokens is not None and n + params.max_tokens > max_len:
        raise ValueError(f"max_tokens={params.max_tokens} cannot fit: prompt has {n} tokens and max_model_len "
                         f"is {max_len} (at most {max_len - n})")
    if params.max_tokens is not None and num_output_tokens >= params.max_tokens > 0:
        raise ValueError(f"the request already has {num_output_tokens} output tokens, max_tokens="
                         f"{params.max_tokens}: nothing is left to generate")
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        raise ValueError(f"min_tokens={params.min_tokens} must be <= max_tokens={params.max_tokens} "
                         f"(max_tokens unset: the rest of max_model_len={max_len} after the {n}-token prompt)")
    check_fits_kv_cache(n + num_output_tokens, n, params.max_tokens, max_len, info.num_kv_blocks, info.block_size)
    for name in ("logprobs", "prompt_logprobs"):
        if (getattr(params, name) or 0) > vocab:
            raise ValueError(f"{name} must be <= the vocabulary size {vocab}, got {getattr(params, name)}")
    outside = [t for t in params.stop_token_ids if t >= vocab and t != params.eos_token_id and t not in info.eos_token_ids]
    if outside:
        raise ValueError(f"stop_token_ids holds token id {outside[0]} outside the vocabulary [0, {vocab})")
    if params.logit_bias and max(params.logit_bias) >= vocab:
        raise ValueError(f"logit_bias holds token id {max(params.logit_bias)} outside the vocabulary [0, {vocab})")


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The params of completion `index` of an n > 1 request, which runs as its own sequence."""
    child = params.clone()
    child.n = 1
    if index > 0:
        child.prompt_logprobs = None   # computed once, by completion 0
    if params.seed is not None:
        # Distinct but reproducible streams for each of the n samples, wrapped into int64 (what the
        # wire and SamplingParams hold); the sampler hashes the seed mod 2**64, so the wrap draws
        # exactly the tokens the unwrapped value would.
        child.seed = (params.seed * 1_000_003 + index + 2 ** 63) % 2 ** 64 - 2 ** 63
    return child
