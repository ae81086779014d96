"""GPT-2: HF's modeling_gpt2 over flat tokens.

Same module tree and parameter names as HF. GPT-2's checkpoints store its
linear layers as `Conv1D`, whose weight is [in, out] (the transpose of
nn.Linear's); `load_weights` transposes them before the parallel layers
shard them. `c_attn` already holds [q; k; v] fused, so QKVParallelLinear
loads it whole (no packed mapping needed).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import nn

from pagedray.models.layers.activation import get_act_fn
from pagedray.models.layers.attention import Attention, AttentionMetadata
from pagedray.models.layers.causal_lm import CausalLM
from pagedray.models.layers.layernorm import LayerNorm
from pagedray.models.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedray.models.layers.pipeline import (IntermediateTensors, PPMissing, StageLayers, current_stage,
                                             missing_prefixes)
from pagedray.models.layers.position_embedding import LearnedPositionalEmbedding
from pagedray.models.layers.vocab_embedding import VocabParallelEmbedding
from pagedray.models.layers.weights import materialize

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")
# Causal-mask buffers that old GPT-2 checkpoints saved next to the weights.
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


class GPT2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        head_dim = hidden // total_heads
        self.c_attn = QKVParallelLinear(hidden, head_dim, total_heads, total_heads, bias=True)
        self.c_proj = RowParallelLinear(hidden, hidden, bias=True)
        scale = head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        self.attn = Attention(self.c_attn.num_heads, head_dim, scale)

    def forward(self, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(hidden_states).chunk(3, dim=-1)
        return self.c_proj(self.attn(q, k, v, kv_cache, attn_metadata))


class GPT2MLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = ColumnParallelLinear(config.hidden_size, inner, bias=True)
        self.act = get_act_fn(config.activation_function)
        self.c_proj = RowParallelLinear(inner, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps=eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(config.hidden_size, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), kv_cache, attn_metadata)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        stage = current_stage()
        first = stage.is_first
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if first else PPMissing()
        self.wpe = LearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size) if first \
            else PPMissing()
        self.h = StageLayers(config.num_hidden_layers, lambda i: GPT2Block(config, i))
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon) if stage.is_last else PPMissing()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is None:
            hidden_states = self.wte(input_ids) + self.wpe(positions)
        else:
            hidden_states = intermediate_tensors["hidden_states"]
        for block, kv_cache in self.h.with_caches(kv_caches):
            hidden_states = block(hidden_states, kv_cache, attn_metadata)
        if not self.h.stage.is_last:
            return IntermediateTensors(hidden_states=hidden_states)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(CausalLM):
    model_name = "transformer"

    def __init__(self, config: PretrainedConfig) -> None:
        model = GPT2Model(config)
        super().__init__(config, model, model.wte, tie_default=True)

    def hf_layout(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """Checkpoint tensors renamed and transposed into nn.Linear's layout."""
        other_stages = missing_prefixes(self)   # dropped here, before a transpose would read them
        for name, weight in weights:
            if name.endswith(_MASK_BUFFERS):
                continue
            if not name.startswith(("transformer.", "lm_head.")):
                name = f"transformer.{name}"  # the original openai-community/gpt2 files have no prefix
            if name.startswith(other_stages):
                continue
            if name.endswith(_CONV1D_WEIGHTS):
                # Materialised whole (each rank reads the full matrix): Conv1D stores [in, out].
                weight = materialize(weight).t()
            yield name, weight
