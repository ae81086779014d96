"""Phi-3 / Phi-4-mini: HF's modeling_phi3 over flat tokens.

A Llama-shaped decoder whose checkpoint already holds the fused `qkv_proj`
([q; k; v] rows) and `gate_up_proj` ([gate; up] rows): the fused parallel
layers take those tensors whole (shard_id None) and cut each rank's heads and
rows out of every part, so `packed_modules_mapping` is empty. Rotary may
cover only part of each head (`partial_rotary_factor`, Phi-4-mini), and the
config's `sliding_window` applies to every layer.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pagedray.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Phi3DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        attn = LlamaAttention(config, qkv_bias=False, o_bias=False, partial_rotary=True,
                              sliding_window=getattr(config, "sliding_window", None))
        mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)
        super().__init__(config, layer_idx, attn, mlp)


class Phi3ForCausalLM(LlamaForCausalLM):
    # The checkpoint's names are already our fused ones: nothing to rename.
    packed_modules_mapping: dict = {}
    layer_cls = Phi3DecoderLayer
