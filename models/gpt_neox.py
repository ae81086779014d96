"""GPT-NeoX (Pythia, GPT-NeoX-20B): HF's modeling_gpt_neox over flat tokens.

Same module tree and parameter names as HF. Rotary covers only the first
`partial_rotary_factor` (formerly `rotary_pct`) of each head; layers add
attention and MLP either in parallel (`use_parallel_residual`) or in series.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import nn

from pagedray.models.layers.activation import get_act_fn
from pagedray.models.layers.attention import Attention, AttentionMetadata
from pagedray.models.layers.causal_lm import CausalLM
from pagedray.models.layers.distributed import divide, get_tp_world_size
from pagedray.models.layers.layernorm import LayerNorm
from pagedray.models.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagedray.models.layers.pipeline import IntermediateTensors, PPMissing, StageLayers, current_stage
from pagedray.models.layers.rotary import get_rope, partial_rotary_dim, rope_config
from pagedray.models.layers.vocab_embedding import VocabParallelEmbedding

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# Causal-mask buffers that older GPT-NeoX checkpoints saved next to the weights.
_MASK_BUFFERS = (".attention.bias", ".attention.masked_bias")


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        hidden, total_heads = config.hidden_size, config.num_attention_heads
        self.head_size = hidden // total_heads
        self.num_heads = divide(total_heads, get_tp_world_size(), "num_attention_heads")
        bias = getattr(config, "attention_bias", True)
        # The checkpoint's rows are per head [q_h; k_h; v_h], so a plain column split
        # gives each rank whole heads: no q/k/v regrouping on load.
        self.query_key_value = ColumnParallelLinear(hidden, 3 * hidden, bias)
        self.dense = RowParallelLinear(hidden, hidden, bias)
        base, scaling = rope_config(config)
        self.rotary_emb = get_rope(self.head_size, partial_rotary_dim(config, self.head_size),
                                   config.max_position_embeddings, base, is_neox_style=True, rope_scaling=scaling)
        self.attn = Attention(self.num_heads, self.head_size, self.head_size ** -0.5)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        qkv = self.query_key_value(hidden_states).view(num_tokens, self.num_heads, 3, self.head_size)
        q, k, v = (t.reshape(num_tokens, -1) for t in qkv.unbind(2))
        out = self.attn(q, k, v, kv_cache, attn_metadata, rotary=self.rotary_emb, positions=positions)
        return self.dense(out)


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = get_act_fn(config.hidden_act)
        self.dense_4h_to_h = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        attn_output = self.attention(positions, self.input_layernorm(hidden_states), kv_cache, attn_metadata)
        if self.use_parallel_residual:
            # x + attn(ln1(x)) + mlp(ln2(x)): both branches read the layer input.
            return hidden_states + attn_output + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        stage = current_stage()
        self.embed_in = VocabParallelEmbedding(config.vocab_size, config.hidden_size) if stage.is_first \
            else PPMissing()
        self.layers = StageLayers(config.num_hidden_layers, lambda i: GPTNeoXLayer(config))
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if stage.is_last \
            else PPMissing()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is None:
            hidden_states = self.embed_in(input_ids)
        else:
            hidden_states = intermediate_tensors["hidden_states"]
        for layer, kv_cache in self.layers.with_caches(kv_caches):
            hidden_states = layer(positions, hidden_states, kv_cache, attn_metadata)
        if not self.layers.stage.is_last:
            return IntermediateTensors(hidden_states=hidden_states)
        return self.final_layer_norm(hidden_states)


class GPTNeoXForCausalLM(CausalLM):
    model_name, lm_head_name = "gpt_neox", "embed_out"

    def __init__(self, config: PretrainedConfig) -> None:
        model = GPTNeoXModel(config)
        super().__init__(config, model, model.embed_in)

    def hf_layout(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        return ((n, w) for n, w in weights if not n.endswith(_MASK_BUFFERS))
