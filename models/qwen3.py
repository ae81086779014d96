"""Qwen3 (dense): Qwen2 plus an RMSNorm over each query and key head before rotary.

HF's modeling_qwen3 over flat tokens. `head_dim` is explicit in the config
(heads * head_dim need not equal hidden_size); q/k/v/o share one
`attention_bias` switch, off in the released models.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pagedray.models.layers.attention import AttentionMetadata
from pagedray.models.layers.layernorm import RMSNorm
from pagedray.models.qwen2 import Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class Qwen3Attention(Qwen2Attention):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, layer_idx, qkv_bias=bias, o_bias=bias)
        # One weight of size head_dim, shared by all heads: replicated on every rank.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class Qwen3DecoderLayer(Qwen2DecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    layer_cls = Qwen3DecoderLayer
