"""Qwen3 (dense): Qwen2 plus an RMSNorm over each query and key head before rotary.

HF's modeling_qwen3 over flat tokens. `head_dim` is explicit in the config
(heads * head_dim need not equal hidden_size); q/k/v/o share one
`attention_bias` switch, off in the released models.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pagedray.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from pagedray.models.qwen2 import layer_sliding_window

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Qwen3DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        bias = bool(getattr(config, "attention_bias", False))
        attn = LlamaAttention(config, qkv_bias=bias, o_bias=bias, qk_norm=True,
                              sliding_window=layer_sliding_window(config, layer_idx))
        mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)
        super().__init__(config, layer_idx, attn, mlp)


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
