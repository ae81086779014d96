"""Per-request sampling parameters, with vLLM's names, defaults and ranges.

Pure Python: the scheduler and engine read these without importing torch. The
constructor validates every field and raises ValueError naming the field, the
allowed range and the value it got.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from pagedray.common.quoting import quote

# vLLM treats a temperature below this as greedy (argmax).
_GREEDY_EPS = 1e-5
# Every integer field fits a signed 64-bit integer: what msgpack (the core's wire), torch.long and
# vLLM's seed range hold. A larger one would pass here and fail later, far from the caller.
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX


def _encodable(text: str) -> bool:
    """UTF-8 can carry it (a lone surrogate, which JSON's \\ud800 escapes make, cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_real(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None          # top-N per generated token, plus the sampled one
    prompt_logprobs: int | None = None   # top-N per prompt token (from the 2nd), plus the actual one
    skip_special_tokens: bool = True
    # Filled by the engine: the tokenizer's eos id (None when unknown).
    eos_token_id: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        self._validate()
        if self.top_k == -1:
            self.top_k = 0

    def _validate(self) -> None:
        def bad(name: str, rule: str) -> None:
            raise ValueError(f"{name} must be {rule}, got {quote(getattr(self, name))}")

        def real_in(name: str, lo: float, hi: float, rule: str, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if not _is_real(v) or v < lo or v > hi or (lo_open and v == lo):
                bad(name, rule)

        def int_at_least(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if not _is_int(v) or v < lo:
                bad(name, ("None or " if optional else "") + f"an integer in [{lo}, 2**63 - 1]")

        int_at_least("n", 1)
        real_in("temperature", 0.0, math.inf, "a finite number >= 0 (0 means greedy)")
        real_in("top_p", 0.0, 1.0, "in (0, 1]", lo_open=True)
        if not _is_int(self.top_k) or self.top_k < -1:
            bad("top_k", "0 or -1 (disabled) or an integer in [1, 2**63 - 1]")
        real_in("min_p", 0.0, 1.0, "in [0, 1]")
        real_in("presence_penalty", -2.0, 2.0, "in [-2, 2]")
        real_in("frequency_penalty", -2.0, 2.0, "in [-2, 2]")
        real_in("repetition_penalty", 0.0, math.inf, "a finite number > 0 (1 disables)", lo_open=True)
        if self.seed is not None and not _is_int(self.seed):
            bad("seed", "None or an integer in [-2**63, 2**63 - 1]")
        int_at_least("max_tokens", 1, optional=True)
        int_at_least("min_tokens", 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens, got min_tokens={self.min_tokens} "
                             f"and max_tokens={self.max_tokens}")
        int_at_least("logprobs", 0, optional=True)
        int_at_least("prompt_logprobs", 0, optional=True)
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "a string or a list of non-empty strings")
        if not all(_encodable(s) for s in self.stop):
            bad("stop", "valid Unicode text (no lone surrogate such as \\ud800)")
        if not isinstance(self.stop_token_ids, list) or any(
                not _is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids in [0, 2**63 - 1]")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
