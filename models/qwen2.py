"""Qwen2 / Qwen2.5: HF's modeling_qwen2 over flat tokens.

A Llama-shaped decoder whose q/k/v projections always carry a bias (o_proj
none), and whose layers may use a sliding window chosen per layer
(`layer_types`, or `use_sliding_window` from `max_window_layers` on in older
configs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pagedray.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def layer_sliding_window(config: PretrainedConfig, layer_idx: int) -> int | None:
    """The sliding window of one layer, None for full attention (as HF's Qwen2/Qwen3 decide it)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    # transformers 4.x configs: the layers from max_window_layers on slide when use_sliding_window is set.
    if getattr(config, "use_sliding_window", False) and layer_idx >= config.max_window_layers:
        return window
    return None


class Qwen2DecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        attn = LlamaAttention(config, qkv_bias=True, o_bias=False,
                              sliding_window=layer_sliding_window(config, layer_idx))
        mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)
        super().__init__(config, layer_idx, attn, mlp)


class Qwen2ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2DecoderLayer
