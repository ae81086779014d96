"""OPT decoders: HF's modeling_opt over flat tokens.

Same module tree and parameter names as HF (q/k/v fused on load). Covers
the OPT-350m shape: embeddings narrower than the hidden size
(`word_embed_proj_dim`, with `project_in`/`project_out`) and post-norm layers
(`do_layer_norm_before=False`, and then no final LayerNorm).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import nn

from pagedray.models.layers.activation import get_act_fn
from pagedray.models.layers.attention import Attention, AttentionMetadata
from pagedray.models.layers.causal_lm import CausalLM
from pagedray.models.layers.layernorm import LayerNorm
from pagedray.models.layers.linear import (ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
                                           RowParallelLinear)
from pagedray.models.layers.pipeline import IntermediateTensors, PPMissing, StageLayers, current_stage
from pagedray.models.layers.position_embedding import LearnedPositionalEmbedding
from pagedray.models.layers.vocab_embedding import VocabParallelEmbedding

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class OPTAttention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        embed_dim, total_heads = config.hidden_size, config.num_attention_heads
        head_dim = embed_dim // total_heads
        self.qkv_proj = QKVParallelLinear(embed_dim, head_dim, total_heads, total_heads, config.enable_bias)
        self.out_proj = RowParallelLinear(embed_dim, embed_dim, config.enable_bias)
        self.attn = Attention(self.qkv_proj.num_heads, head_dim, head_dim ** -0.5)

    def forward(self, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        affine = config.layer_norm_elementwise_affine
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = LayerNorm(config.hidden_size, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(config.hidden_size, config.ffn_dim, config.enable_bias)
        self.activation_fn = get_act_fn(config.activation_function)
        self.fc2 = RowParallelLinear(config.ffn_dim, config.hidden_size, config.enable_bias)
        self.final_layer_norm = LayerNorm(config.hidden_size, elementwise_affine=affine)

    def forward(self, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        # Pre-norm (most OPTs) normalises each block's input; post-norm (350m) its residual sum.
        pre = self.do_layer_norm_before
        residual = hidden_states
        if pre:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states, kv_cache, attn_metadata)
        if not pre:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        residual = hidden_states
        if pre:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = residual + self.fc2(self.activation_fn(self.fc1(hidden_states)))
        if not pre:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class OPTDecoder(nn.Module):
    """Under pipeline parallelism the first stage embeds (and projects in), the last norms (and
    projects out); the hidden states between stages are `hidden_size` wide."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        stage = current_stage()
        hidden, proj_dim = config.hidden_size, config.word_embed_proj_dim
        projected = proj_dim != hidden
        if stage.is_first:
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, proj_dim)
            self.embed_positions = LearnedPositionalEmbedding(config.max_position_embeddings, hidden, offset=2)
            # Replicated: two small bias-free projections, only present when the widths differ.
            self.project_in = ReplicatedLinear(proj_dim, hidden, bias=False) if projected else None
        else:
            self.embed_tokens, self.embed_positions = PPMissing(), PPMissing()
            self.project_in = PPMissing() if projected else None
        final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        if stage.is_last:
            self.project_out = ReplicatedLinear(hidden, proj_dim, bias=False) if projected else None
            self.final_layer_norm = (LayerNorm(hidden, elementwise_affine=config.layer_norm_elementwise_affine)
                                     if final_norm else None)
        else:
            self.project_out = PPMissing() if projected else None
            self.final_layer_norm = PPMissing() if final_norm else None
        self.layers = StageLayers(config.num_hidden_layers, lambda i: OPTDecoderLayer(config))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is None:
            hidden_states = self.embed_tokens(input_ids)
            if self.project_in is not None:
                hidden_states = self.project_in(hidden_states)
            hidden_states = hidden_states + self.embed_positions(positions)
        else:
            hidden_states = intermediate_tensors["hidden_states"]
        for layer, kv_cache in self.layers.with_caches(kv_caches):
            hidden_states = layer(hidden_states, kv_cache, attn_metadata)
        if not self.layers.stage.is_last:
            return IntermediateTensors(hidden_states=hidden_states)
        if self.final_layer_norm is not None:
            hidden_states = self.final_layer_norm(hidden_states)
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return hidden_states


class OPTModel(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.decoder = OPTDecoder(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        return self.decoder(input_ids, positions, kv_caches, attn_metadata, intermediate_tensors)


class OPTForCausalLM(CausalLM):
    packed_modules_mapping = {"qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")]}

    def __init__(self, config: PretrainedConfig) -> None:
        model = OPTModel(config)
        super().__init__(config, model, model.decoder.embed_tokens, tie_default=True,
                         head_width=config.word_embed_proj_dim)

    def hf_layout(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        # facebook/opt-* checkpoints name the decoder "decoder.*"; save_pretrained writes "model.decoder.*".
        return ((f"model.{n}" if n.startswith("decoder.") else n, w) for n, w in weights)
