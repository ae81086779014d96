"""Qwen2 / Qwen2.5: HF's modeling_qwen2 over flat tokens.

A Llama-shaped decoder whose q/k/v projections always carry a bias (o_proj
none), and whose layers may use a sliding window chosen per layer
(`layer_types`, or `use_sliding_window` from `max_window_layers` on in older
configs).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from pagedray.models.layers.attention import Attention, AttentionMetadata
from pagedray.models.layers.layernorm import RMSNorm
from pagedray.models.layers.linear import QKVParallelLinear, RowParallelLinear
from pagedray.models.layers.logits import LogitsProcessor
from pagedray.models.layers.rotary import get_rope, rope_config
from pagedray.models.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedray.models.llama import LlamaMLP
from pagedray.models.utils import load_packed_weights

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


class Qwen2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, qkv_bias: bool = True,
                 o_bias: bool = False) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // total_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv_heads, qkv_bias)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, bias=o_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        base, scaling = rope_config(config)
        self.rotary_emb = get_rope(self.head_dim, self.head_dim, config.max_position_embeddings, base,
                                   is_neox_style=True, rope_scaling=scaling)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              sliding_window=layer_sliding_window(config, layer_idx))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class Qwen2DecoderLayer(nn.Module):
    attention_cls: type[nn.Module] = Qwen2Attention

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_idx)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Qwen2Model(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_cls: type[nn.Module] = Qwen2DecoderLayer) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states, residual = layer(positions, hidden_states, kv_cache, attn_metadata, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Qwen2ForCausalLM(nn.Module):
    packed_modules_mapping = {
        "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }
    layer_cls: type[nn.Module] = Qwen2DecoderLayer

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config, self.layer_cls)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        skip = {"lm_head.weight"} if self.tie_word_embeddings else set()
        return load_packed_weights(self, weights, self.packed_modules_mapping, skip)
