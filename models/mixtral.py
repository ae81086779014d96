"""Mixtral: Mistral's attention with a sparse MoE (top-k of N gated experts) in place of the MLP.

HF's modeling_mixtral over flat tokens. The checkpoint keeps the hub layout
(`block_sparse_moe.gate`, `block_sparse_moe.experts.<e>.w1/w2/w3`), which
transformers also writes back on save; experts are stacked into `FusedMoE`,
whose docstring says how they are split over tensor-parallel ranks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from pagedray.models.layers.linear import ReplicatedLinear
from pagedray.models.layers.moe import DOWN, GATE, UP, FusedMoE, load_weights_with_experts
from pagedray.models.llama import LlamaDecoderLayer, LlamaForCausalLM

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        # Replicated router: every rank must pick the same experts for a token.
        self.gate = ReplicatedLinear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = FusedMoE(config.num_local_experts, config.num_experts_per_tok, config.hidden_size,
                                config.intermediate_size, config.hidden_act, renormalize=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden_states, self.gate(hidden_states))


class MixtralDecoderLayer(LlamaDecoderLayer):
    mlp_name = "block_sparse_moe"

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        # Llama's attention from the config, as Mistral's: GQA, rotary, optional sliding window.
        super().__init__(config, layer_idx, mlp=MixtralSparseMoeBlock(config))


class MixtralForCausalLM(LlamaForCausalLM):
    packed_modules_mapping = {"qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")]}
    layer_cls = MixtralDecoderLayer
    # Per-expert checkpoint tensors `experts.<e>.<name>.weight` -> part of the stacked expert weights.
    expert_names = {"w1": GATE, "w3": UP, "w2": DOWN}

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> set[str]:
        return load_weights_with_experts(self, weights, self.packed_modules_mapping, self.expert_names,
                                         self.skipped_weights())
