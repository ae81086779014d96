"""What the engine hands back to callers (vLLM's shapes). Pure Python."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    # Per generated token: {token_id: logprob} holding the sampled token and the top-N.
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None   # "stop" | "length" | "abort" | None while running

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    # Per prompt position (the first has none): {token_id: logprob}, when prompt_logprobs was asked.
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
