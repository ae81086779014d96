"""SpeculativeConfig: vLLM's `speculative_config` dict, typed and validated (torch-free).

`LLM(..., speculative_config={"method": "ngram", "num_speculative_tokens": 4, ...})` and
`serve --speculative-config JSON` both land here. Every bad field is a ValueError that names it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedray.common.config import from_fields

METHODS = ("ngram", "draft_model", "eagle", "eagle3")
# More proposals than this per step buy nothing (acceptance decays geometrically) and each
# one is a row of the verification forward and a slot of KV cache.
MAX_SPECULATIVE_TOKENS = 16
# The n-gram lookup scans the request's tokens backwards for each length; keep it short.
MAX_PROMPT_LOOKUP = 64
# Back-off (cluster/core/spec_backoff.py): a longer pause than this between probes would leave a
# request that starts to repeat itself (where proposals pay) without speculation for too long.
MAX_BACKOFF_STEPS = 1024


@dataclass
class SpeculativeConfig:
    method: str | None = None
    num_speculative_tokens: int | None = None
    model: str | None = None                  # the draft model / EAGLE head folder
    prompt_lookup_min: int | None = None      # n-gram only: shortest suffix matched
    prompt_lookup_max: int | None = None      # n-gram only: longest suffix matched
    # EAGLE-3: the target layers whose outputs the head reads (None: vLLM's (2, L/2, L-3)).
    eagle_aux_hidden_state_layer_ids: list[int] | None = None
    # Back-off (cluster/core/spec_backoff.py; not a vLLM field): after this many verifications in a
    # row that accepted none of a request's proposals, it proposes nothing for a pause of as many
    # steps, then probes with one verification; each failed probe doubles the pause, up to
    # backoff_max_steps; an accepted proposal ends it. 0: every step verifies (vLLM's behaviour).
    backoff_after_failed_steps: int = 4
    backoff_max_steps: int = 64

    @classmethod
    def from_dict(cls, value: "dict[str, Any] | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        return from_fields(cls, value, "speculative_config")

    def __post_init__(self) -> None:
        if self.method is None and self.model is not None:
            self.method = "draft_model"
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not _is_int(k) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be an integer in "
                             f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        self._check_backoff()
        if self.method == "ngram":
            self._check_ngram()
        else:
            self._check_draft()

    def _check_backoff(self) -> None:
        after, most = self.backoff_after_failed_steps, self.backoff_max_steps
        if not _is_int(after) or not 0 <= after <= MAX_BACKOFF_STEPS:
            raise ValueError(f"speculative_config.backoff_after_failed_steps must be an integer in "
                             f"[0, {MAX_BACKOFF_STEPS}] (0: never back off), got {after!r}")
        if not _is_int(most) or not 1 <= most <= MAX_BACKOFF_STEPS:
            raise ValueError(f"speculative_config.backoff_max_steps must be an integer in "
                             f"[1, {MAX_BACKOFF_STEPS}], got {most!r}")

    def _check_ngram(self) -> None:
        if self.model is not None:
            raise ValueError(f"speculative_config.model must be unset for method 'ngram' (it proposes "
                             f"from the request's own tokens), got {self.model!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        for name, v in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if v is not None and (not _is_int(v) or not 1 <= v <= MAX_PROMPT_LOOKUP):
                raise ValueError(f"speculative_config.{name} must be an integer in [1, {MAX_PROMPT_LOOKUP}], "
                                 f"got {v!r}")
        if lo is None and hi is None:
            lo = hi = 5      # vLLM's default
        lo = hi if lo is None else lo
        hi = lo if hi is None else hi
        if lo > hi:
            raise ValueError(f"speculative_config.prompt_lookup_min ({lo}) must be <= prompt_lookup_max ({hi})")
        self.prompt_lookup_min, self.prompt_lookup_max = lo, hi

    def _check_draft(self) -> None:
        for name in ("prompt_lookup_min", "prompt_lookup_max"):
            if getattr(self, name) is not None:
                raise ValueError(f"speculative_config.{name} is only for method 'ngram', got method "
                                 f"{self.method!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"speculative_config.model must be the local folder of the draft for method "
                             f"{self.method!r}, got {self.model!r}")
        from pagedray.common.config import check_checkpoint_folder
        try:
            check_checkpoint_folder(self.model)
        except ValueError as exc:
            raise ValueError(f"speculative_config.model: {exc}") from None
        ids = self.eagle_aux_hidden_state_layer_ids
        if ids is not None and (self.method != "eagle3" or not isinstance(ids, list)
                                or not all(_is_int(i) and i >= 0 for i in ids) or not ids):
            raise ValueError(f"speculative_config.eagle_aux_hidden_state_layer_ids must be a non-empty list "
                             f"of layer indices, for method 'eagle3' only, got {ids!r}")

    @property
    def uses_draft_model(self) -> bool:
        """Whether a model proposes on the workers (its own KV cache), rather than the n-gram lookup."""
        return self.method != "ngram"

    @property
    def num_lookahead_slots(self) -> int:
        """KV slots a step reserves past its verified tokens: a draft model writes its k-1 proposals'
        K/V (and the bonus token's) into the request's blocks in the same step."""
        return self.num_speculative_tokens if self.uses_draft_model else 0

    def check_target(self, target_hf_config: Any, draft_hf_config: Any) -> None:
        """The draft must speak the target's vocabulary (EAGLE-3 may map a smaller one onto it)."""
        tv, dv = target_hf_config.vocab_size, draft_hf_config.vocab_size
        if self.method in ("draft_model", "eagle") and tv != dv:
            raise ValueError(f"speculative_config.model {self.model!r} has vocab_size={dv}, the target "
                             f"has {tv}: a draft must share the target's vocabulary")
        if self.method in ("eagle", "eagle3") and draft_hf_config.hidden_size != target_hf_config.hidden_size:
            raise ValueError(f"speculative_config.model {self.model!r} has hidden_size="
                             f"{draft_hf_config.hidden_size}, the target has {target_hf_config.hidden_size}: "
                             f"an EAGLE head reads the target's hidden states")


    def check_tensor_parallel(self, draft_hf_config: Any, tp_size: int) -> None:
        """A draft runs sharded over the target's tensor-parallel ranks: its attention heads must split
        over them (KV heads may be replicated when there are fewer than ranks), as the target's do."""
        heads = getattr(draft_hf_config, "num_attention_heads", None)
        kv = getattr(draft_hf_config, "num_key_value_heads", None) or heads
        if tp_size == 1 or not isinstance(heads, int):
            return
        if heads % tp_size or (kv % tp_size if kv >= tp_size else tp_size % kv):
            raise ValueError(f"speculative_config.model {self.model!r} has num_attention_heads={heads} and "
                             f"num_key_value_heads={kv}, which do not split over tensor_parallel_size="
                             f"{tp_size}: the draft runs sharded over the target's ranks")

def ngram_propose(tokens: list[int], lookup_min: int, lookup_max: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of `tokens`
    (between lookup_min and lookup_max tokens long) — prompt lookup decoding. [] when none matches."""
    n = len(tokens)
    if n < lookup_min + 1:
        return []
    last = tokens[-1]
    best_len, best_end = 0, -1
    # Earlier occurrences of the last token, right to left (found by C scans of the reversed list:
    # this runs for every request every step, over its whole context), each match grown leftwards:
    # the first match of full length wins (the most recent), else the longest one seen.
    rev = tokens[::-1]
    j = 0
    while True:
        try:
            j = rev.index(last, j + 1)
        except ValueError:
            break
        i = n - 1 - j
        m = 1
        while m < lookup_max and i - m >= 0 and tokens[i - m] == tokens[n - 1 - m]:
            m += 1
        if m > best_len:
            best_len, best_end = m, i
            if m == lookup_max:
                break
    if best_len < lookup_min:
        return []
    return tokens[best_end + 1:best_end + 1 + k]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
