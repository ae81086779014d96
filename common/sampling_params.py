"""Per-request sampling parameters, with vLLM's names, defaults and ranges.

Pure Python: the scheduler and engine read these without importing torch. The
constructor validates every field and raises ValueError naming the field, the
allowed range and the value it got.
"""
from __future__ import annotations

import copy
import json as _json
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


# A grammar's source (schema, regex, EBNF, all choices together) above this many characters is
# refused before any compile: compile time and memory grow with it.
MAX_STRUCTURED_CHARS = 256 * 1024
# logit_bias: OpenAI's range for a bias, and how many tokens one request may bias.
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 1024

_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """Constrained decoding (vLLM's `StructuredOutputsParams`): set exactly one of
    `json` (a JSON schema, as a dict or its JSON text), `regex`, `choice` (the output is one of
    these strings), `grammar` (EBNF/GBNF text) or `json_object=True` (any JSON object).

    Syntax errors in a schema, regex or grammar are found when the engine compiles it (the
    request is then refused with a ValueError naming the field); here only shapes and sizes."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.choice, tuple):
            self.choice = list(self.choice)
        set_kinds = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(_STRUCTURED_KINDS)}, "
                             f"got {', '.join(set_kinds) or 'none'}")
        kind = set_kinds[0]
        value = getattr(self, kind)
        if kind == "json" and isinstance(value, str):
            try:
                value = _json.loads(value)
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json must be a JSON schema (an object or its JSON "
                                 f"text), got text that is not JSON: {exc}") from None
            if not isinstance(value, (dict, bool)):
                raise ValueError(f"structured_outputs.json must be a JSON schema object, got {quote(value)}")
        elif kind == "json" and not isinstance(value, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema (an object or its JSON text), "
                             f"got {quote(value)}")
        elif kind in ("regex", "grammar") and (not isinstance(value, str) or not value):
            raise ValueError(f"structured_outputs.{kind} must be a non-empty string, got {quote(value)}")
        elif kind == "choice" and (not isinstance(value, list) or not value
                                   or any(not isinstance(c, str) or not c for c in value)):
            raise ValueError(f"structured_outputs.choice must be a non-empty list of non-empty strings, "
                             f"got {quote(value)}")
        elif kind == "json_object" and value is not True:
            raise ValueError(f"structured_outputs.json_object must be true, got {quote(value)}")
        size = len(self.source)
        if size > MAX_STRUCTURED_CHARS:
            raise ValueError(f"structured_outputs.{kind} is {size} characters, above the limit of "
                             f"{MAX_STRUCTURED_CHARS}")

    @property
    def kind(self) -> str:
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def source(self) -> str:
        """The constraint as one canonical text (the compile cache's key, with `kind`)."""
        kind = self.kind
        if kind == "json":
            schema = _json.loads(self.json) if isinstance(self.json, str) else self.json
            # Key order kept: the output writes the properties in the schema's order.
            return _json.dumps(schema, separators=(",", ":"))
        if kind == "choice":
            return _json.dumps(self.choice)
        if kind == "json_object":
            return ""
        return getattr(self, kind)

    @classmethod
    def coerce(cls, value) -> "StructuredOutputsParams | None":
        """A StructuredOutputsParams from itself or a dict of its fields (ValueError naming the rest)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"structured_outputs must be an object with one of {', '.join(_STRUCTURED_KINDS)}, "
                             f"got {quote(value)}")
        unknown = sorted(set(value) - set(_STRUCTURED_KINDS))
        if unknown:
            raise ValueError(f"structured_outputs has unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(_STRUCTURED_KINDS)}")
        return cls(**value)


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
    # Constrained decoding (JSON schema, regex, choice, grammar, any JSON object); None: free text.
    structured_outputs: StructuredOutputsParams | None = None
    # Token id -> bias added to its logit before sampling (OpenAI's logit_bias), each in [-100, 100].
    logit_bias: dict[int, float] | None = None
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
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        if isinstance(self.logit_bias, dict):
            self.logit_bias = _int_keys(self.logit_bias)
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
        self._validate_logit_bias()

    def _validate_logit_bias(self) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ValueError(f"logit_bias must be a map of token id -> bias, got {quote(bias)}")
        if len(bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias has {len(bias)} tokens, above the limit of {MAX_LOGIT_BIAS_TOKENS}")
        for token, value in bias.items():
            if not _is_int(token) or token < 0:
                raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {quote(token)}")
            if not _is_real(value) or abs(value) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias[{token}] must be a number in [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}], got {quote(value)}")

    @property
    def constrains_logits(self) -> bool:
        """Whether the sampler must change this request's logits (a grammar mask or a logit bias)."""
        return self.structured_outputs is not None or bool(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)


def _int_keys(bias: dict) -> dict:
    """JSON maps have string keys ("50256"): token ids as ints; anything else is left for the check."""
    out = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            key = int(key)
        out[key] = value
    return out
