"""InputProcessor: a prompt and its params -> a validated `CoreRequest`, tokenized once.

The front (offline `LLMEngine`, serving `Frontend`) calls it before anything reaches a core; the
checks are the core's own (`core.validation`), so a request that passes here is one the core takes.
"""
from __future__ import annotations

import logging
import math

from pagedray.cluster.core.messages import CoreRequest, EngineInfo
from pagedray.common.lora import LoRARequest
from pagedray.cluster.core.validation import apply_defaults, check_request
from pagedray.cluster.serving.limits import check_text
from pagedray.common.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class InputProcessor:
    def __init__(self, tokenizer, info: EngineInfo) -> None:
        self.tokenizer = tokenizer
        self.info = info
        self._max_token_bytes: int | None = None
        self.eos_token_ids = list(info.eos_token_ids)
        if not self.eos_token_ids and getattr(tokenizer, "eos_token_id", None) is not None:
            self.eos_token_ids = [tokenizer.eos_token_id]

    def tokenize(self, prompt: str | dict) -> tuple[str | None, list[int]]:
        """(the prompt's text if it had one, its token ids); ValueError for a malformed prompt."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("prompt is text but this model has no tokenizer: pass prompt_token_ids")
            check_text("prompt", prompt)
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(type(t) is int for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        raise ValueError(f"prompt must be a str or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")

    def check_text_size(self, prompt: str) -> None:
        """Refuse, before tokenizing, a text that could never fit max_model_len: no token of this
        vocabulary covers more than `max_token_bytes` bytes of text."""
        if self.tokenizer is None or len(prompt) < self.info.max_model_len:
            return   # fewer chars than max_model_len: it may fit (and tokenizing it is cheap)
        self.check_byte_size(len(prompt.encode("utf-8", "surrogatepass")), "prompt")

    def check_byte_size(self, size: int, field: str) -> None:
        """Refuse `size` bytes of text under `field` when no tokenization of it fits max_model_len."""
        max_len = self.info.max_model_len
        if self.tokenizer is None or size < max_len:
            return
        if self._max_token_bytes is None:
            self._max_token_bytes = max_token_bytes(self.tokenizer)
        fewest = math.ceil(size / self._max_token_bytes)
        if fewest >= max_len:
            raise ValueError(f"{field} is {size} bytes, so at least {fewest} tokens (no token of this model "
                             f"covers more than {self._max_token_bytes} bytes): it must be shorter than "
                             f"max_model_len={max_len} tokens")

    def process(self, request_id: str, prompt: str | dict, params: SamplingParams | None,
                arrival_time: float = 0.0, lora_request: LoRARequest | None = None) -> tuple[str | None, CoreRequest]:
        """Tokenize, fill the engine's defaults and check; the params are copied, never changed."""
        params = (params or SamplingParams()).clone()
        text, token_ids = self.tokenize(prompt)
        return text, self.make_request(request_id, token_ids, params, arrival_time, lora_request)

    def make_request(self, request_id: str, token_ids: list[int], params: SamplingParams,
                     arrival_time: float = 0.0, lora_request: LoRARequest | None = None) -> CoreRequest:
        """Defaults and checks on an already tokenized prompt (`params` is filled in place)."""
        apply_defaults(params, len(token_ids), self.info.max_model_len, self.eos_token_ids)
        check_request(token_ids, params, self.info)
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        return CoreRequest(request_id, token_ids, params, arrival_time=arrival_time, lora_request=lora_request)


def load_tokenizer(model: str, tokenizer: str):
    """The checkpoint's tokenizer; None for a weights-only folder (token-id prompts still work)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(tokenizer)
    except Exception as exc:
        if tokenizer != model:
            raise ValueError(f"cannot load tokenizer {tokenizer!r}: {exc}") from exc
        logger.warning("no tokenizer in %s; only prompt_token_ids prompts will work", model)
        return None


def max_token_bytes(tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text one token can cover: the longest vocabulary entry,
    measured on its stored form (byte-level BPE stores a byte as one char of 1-2 bytes, sentencepiece
    a space as the 3-byte "\u2581", byte fallback a byte as "<0x..>"; each is at least the text's bytes)."""
    vocab = tokenizer.get_vocab()
    return max(1, max((len(piece.encode("utf-8", "surrogatepass")) for piece in vocab), default=1))
