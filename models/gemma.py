"""Gemma (1): HF's modeling_gemma over flat tokens.

Differences from Llama: `head_dim` is explicit (heads * head_dim may differ
from hidden_size), embeddings are multiplied by sqrt(hidden_size) (rounded to
the model dtype, as HF does), every RMSNorm scales by (1 + w), the gated MLP
uses tanh-approximated GELU, and the LM head is tied to the embedding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from pagedray.models.layers.attention import AttentionMetadata
from pagedray.models.layers.layernorm import GemmaRMSNorm
from pagedray.models.layers.logits import LogitsProcessor
from pagedray.models.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedray.models.llama import LlamaAttention, LlamaMLP
from pagedray.models.utils import load_packed_weights

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def gemma_activation(config: PretrainedConfig) -> str:
    """The released configs say "gelu" but were trained with the tanh approximation (HF PR 29402)."""
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    return "gelu_pytorch_tanh" if act == "gelu" else act


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)  # explicit head_dim, no sliding window in Gemma 1
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, gemma_activation(config), bias=False)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

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


class GemmaModel(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GemmaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = config.hidden_size ** 0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        # A tensor in the embedding dtype: in bf16, sqrt(3072) is 55.5, and the checkpoints expect that.
        hidden_states = embeds * torch.tensor(self.embed_scale, dtype=embeds.dtype, device=embeds.device)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden_states, residual = layer(positions, hidden_states, kv_cache, attn_metadata, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class GemmaForCausalLM(nn.Module):
    packed_modules_mapping = {
        "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.config = config
        self.model = GemmaModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
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
