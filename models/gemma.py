"""Gemma (1): HF's modeling_gemma over flat tokens.

Differences from Llama: `head_dim` is explicit (heads * head_dim may differ
from hidden_size), embeddings are multiplied by sqrt(hidden_size) (rounded to
the model dtype, as HF does), every RMSNorm scales by (1 + w), the gated MLP
uses tanh-approximated GELU, and the LM head is tied to the embedding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pagedray.models.layers.causal_lm import CausalLM
from pagedray.models.layers.layernorm import GemmaRMSNorm
from pagedray.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel

if TYPE_CHECKING:
    from transformers import PretrainedConfig


def gemma_activation(config: PretrainedConfig) -> str:
    """The released configs say "gelu" but were trained with the tanh approximation (HF PR 29402)."""
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    return "gelu_pytorch_tanh" if act == "gelu" else act


class GemmaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        # Llama's attention (explicit head_dim, no sliding window in Gemma 1), Gemma's MLP and norms.
        mlp = LlamaMLP(config.hidden_size, config.intermediate_size, gemma_activation(config), bias=False)
        super().__init__(config, layer_idx, mlp=mlp, norm_cls=GemmaRMSNorm)


class GemmaModel(LlamaModel):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config, GemmaDecoderLayer, norm_cls=GemmaRMSNorm)
        self.embed_scale = config.hidden_size ** 0.5

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        # A tensor in the embedding dtype: in bf16, sqrt(3072) is 55.5, and the checkpoints expect that.
        return embeds * torch.tensor(self.embed_scale, dtype=embeds.dtype, device=embeds.device)


class GemmaForCausalLM(CausalLM):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    intermediate_names = LlamaForCausalLM.intermediate_names

    def __init__(self, config: PretrainedConfig) -> None:
        model = GemmaModel(config)
        super().__init__(config, model, model.embed_tokens, tie_default=True)
