"""Phi-3 / Phi-4-mini: HF's modeling_phi3 over flat tokens.

A Llama-shaped decoder whose checkpoint already holds the fused `qkv_proj`
([q; k; v] rows) and `gate_up_proj` ([gate; up] rows): the fused parallel
layers take those tensors whole (shard_id None) and cut each rank's heads and
rows out of every part, so `packed_modules_mapping` is empty. Rotary may
cover only part of each head (`partial_rotary_factor`, Phi-4-mini), and the
config's `sliding_window` applies to every layer.
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


def partial_rotary_factor(config: PretrainedConfig) -> float:
    """transformers >= 5 keeps it in rope_parameters; 4.x on the config itself."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0)


class Phi3Attention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // total_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv_heads, bias=False)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, bias=False)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        base, scaling = rope_config(config)
        rotary_dim = int(self.head_dim * partial_rotary_factor(config))
        self.rotary_emb = get_rope(self.head_dim, rotary_dim, config.max_position_embeddings, base,
                                   is_neox_style=True, rope_scaling=scaling)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              sliding_window=getattr(config, "sliding_window", None))

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class Phi3DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.self_attn = Phi3Attention(config)
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


class Phi3Model(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Phi3DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states, residual = layer(positions, hidden_states, kv_cache, attn_metadata, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Phi3ForCausalLM(nn.Module):
    # The checkpoint's names are already our fused ones: nothing to rename.
    packed_modules_mapping: dict = {}

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Phi3Model(config)
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
