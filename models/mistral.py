"""Mistral: Llama's network plus a sliding attention window when the config sets one.

HF's MistralForCausalLM differs from its Llama only in passing
`config.sliding_window` (None: full attention) to attention, which
`LlamaAttention` already honours, so the class is Llama's under Mistral's
name: the registry, logs and the conformance kit report it as Mistral.
"""
from __future__ import annotations

from pagedray.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
