"""Llama 1/2/3 and Mistral-style decoders: HF's modeling_llama over flat tokens.

Same module tree and parameter names as HF (q/k/v and gate/up fused on load),
with the tensor-parallel layers and the paged `Attention` in place of
nn.Linear/nn.Embedding and HF's attention functions. The Llama-shaped models
(Qwen2/3, Phi-3, Gemma, Mixtral) reuse these classes: their differences are
the flags of `LlamaAttention` and the attention, MLP and norm a layer is given.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from pagedray.models.layers.activation import get_act_and_mul_fn
from pagedray.models.layers.attention import Attention, AttentionMetadata
from pagedray.models.layers.causal_lm import CausalLM
from pagedray.models.layers.layernorm import RMSNorm
from pagedray.models.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedray.models.layers.pipeline import IntermediateTensors, PPMissing, StageLayers, current_stage
from pagedray.models.layers.rotary import get_rope, partial_rotary_dim, rope_config
from pagedray.models.layers.vocab_embedding import VocabParallelEmbedding

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)
        self.act_fn = get_act_and_mul_fn(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """Rotary attention with grouped KV heads; `head_dim` from the config when it sets one.

    The flags are where Llama-shaped models differ: biases on q/k/v and on o,
    this layer's sliding window (None: full attention), rotary over only the
    config's partial rotary factor of each head (Phi-3), and an RMSNorm over
    each query and key head before rotary (Qwen3).
    """

    def __init__(self, config: PretrainedConfig, qkv_bias: bool = False, o_bias: bool = False,
                 sliding_window: int | None = None, partial_rotary: bool = False, qk_norm: bool = False) -> None:
        super().__init__()
        hidden = config.hidden_size
        total_heads = config.num_attention_heads
        total_kv_heads = getattr(config, "num_key_value_heads", None) or total_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // total_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, total_heads, total_kv_heads, qkv_bias)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, hidden, o_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        base, scaling = rope_config(config)
        rotary_dim = partial_rotary_dim(config, self.head_dim) if partial_rotary else self.head_dim
        self.rotary_emb = get_rope(self.head_dim, rotary_dim, config.max_position_embeddings, base,
                                   is_neox_style=True, rope_scaling=scaling)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              sliding_window=sliding_window)
        # One weight of size head_dim, shared by all heads: replicated on every rank.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        out = self.attn(q, k, v, kv_cache, attn_metadata, rotary=self.rotary_emb, positions=positions)
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm layer: h = x + attn(norm(x)), out = h + mlp(norm(h)).

    Built from the config as Llama's; a Llama-shaped model passes its own
    attention, MLP and norm class. `mlp_name` is HF's name of the feed-forward
    (Mixtral: "block_sparse_moe"), which the checkpoint's names follow.
    """
    mlp_name = "mlp"

    def __init__(self, config: PretrainedConfig, layer_idx: int, self_attn: nn.Module | None = None,
                 mlp: nn.Module | None = None, norm_cls: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        if self_attn is None:
            bias = getattr(config, "attention_bias", False)
            # Mistral's configs carry sliding_window (None = full attention); Llama's have none.
            self_attn = LlamaAttention(config, bias, bias, sliding_window=getattr(config, "sliding_window", None))
        if mlp is None:
            mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                           getattr(config, "mlp_bias", False))
        self.self_attn = self_attn
        setattr(self, self.mlp_name, mlp)
        self.input_layernorm = norm_cls(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = norm_cls(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the next norm: (h, r) -> (norm(h + r), h + r).
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, kv_cache, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return getattr(self, self.mlp_name)(hidden_states), residual


class LlamaModel(nn.Module):
    """Token embedding, `layer_cls(config, i)` for each layer, final norm.

    Under pipeline parallelism a stage holds its range of layers; the first embeds, the last
    norms, and the others pass (hidden_states, residual) on.
    """

    def __init__(self, config: PretrainedConfig, layer_cls: type[nn.Module] = LlamaDecoderLayer,
                 norm_cls: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        stage = current_stage()
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size) if stage.is_first
                             else PPMissing())
        self.layers = StageLayers(config.num_hidden_layers, lambda i: layer_cls(config, i))
        self.norm = norm_cls(config.hidden_size, config.rms_norm_eps) if stage.is_last else PPMissing()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata,
                intermediate_tensors: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is None:
            hidden_states, residual = self.embed(input_ids), None
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for layer, kv_cache in self.layers.with_caches(kv_caches):
            hidden_states, residual = layer(positions, hidden_states, kv_cache, attn_metadata, residual)
        if not self.layers.stage.is_last:
            return IntermediateTensors(hidden_states=hidden_states, residual=residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(CausalLM):
    packed_modules_mapping = {
        "qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
        "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)],
    }
    # A Llama-shaped model (Qwen2, Phi-3, Mixtral, ...) subclasses this with its own layer.
    layer_cls: type[nn.Module] = LlamaDecoderLayer
    intermediate_names = ("hidden_states", "residual")

    def __init__(self, config: PretrainedConfig) -> None:
        model = LlamaModel(config, self.layer_cls)
        super().__init__(config, model, model.embed_tokens)
