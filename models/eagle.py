"""EAGLE and EAGLE-3 draft heads, loaded as their authors publish them.

EAGLE (Li et al., 2024; checkpoints like yuhuili/EAGLE-LLaMA3-Instruct-8B): `fc` [h, 2h] (with or
without bias) over [embed(token p+1), target feature at p], then one Llama decoder layer without
its input norm (`layers.0.*`); the output is both the next feature and the input of the target's LM
head. `embed_tokens.weight` is optional (the target's embedding otherwise).

EAGLE-3 (Li et al., 2025; yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): `fc` [h, n·h] over n target layers'
hidden states (the inputs of layers `eagle_aux_hidden_state_layer_ids`, default (2, L/2, L-3)), a
decoder layer `midlayer.*` whose attention reads [input_layernorm(embed), hidden_norm(feature)]
(q/k/v take 2h), its own `norm` and `lm_head` over a draft vocabulary mapped onto the target's by
`d2t` (target id = draft id + d2t[draft id]); `t2d` is not needed for greedy proposals.

Under tensor parallelism the head shards as the target does: `fc` is replicated, the decoder layer's
parallel layers split its heads and MLP, EAGLE-3's `lm_head` is vocabulary-parallel and its logits
are gathered (every rank then maps the same argmax through the whole `d2t`).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from pagedray.models.layers.layernorm import RMSNorm
from pagedray.models.layers.linear import QKVParallelLinear, ReplicatedLinear
from pagedray.models.layers.logits import LogitsProcessor
from pagedray.models.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from pagedray.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from pagedray.models.utils import load_packed_weights


class EagleHead(nn.Module):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, config: Any, eagle3: bool, aux_layer_ids: list[int] | None, fc_bias: bool,
                 own_embedding: bool) -> None:
        super().__init__()
        h = config.hidden_size
        self.eagle3 = eagle3
        self.aux_layer_ids = aux_layer_ids if eagle3 else None
        self.fc = ReplicatedLinear(h * (len(aux_layer_ids) if eagle3 else 2), h, bias=fc_bias)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h) if own_embedding else None
        layer = LlamaDecoderLayer(config, 0)
        attn = layer.self_attn
        self.head_dim, self.num_kv_heads = attn.head_dim, attn.num_kv_heads
        if eagle3:
            heads = config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            attn.qkv_proj = QKVParallelLinear(2 * h, attn.head_dim, heads, kv_heads,
                                              getattr(config, "attention_bias", False))
            layer.hidden_norm = RMSNorm(h, config.rms_norm_eps)
            self.midlayer = layer
            self.norm = RMSNorm(h, config.rms_norm_eps)
            draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
            self.lm_head = ParallelLMHead(draft_vocab, h)
            self.logits_processor = LogitsProcessor(draft_vocab)
            self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long), persistent=False)
        else:
            layer.input_layernorm = nn.Identity()   # EAGLE's first layer has no input norm
            self.layers = nn.ModuleList([layer])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata, feature: torch.Tensor, target_embedding: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden for the LM head, feature for the next position)."""
        embeds = (self.embed_tokens or target_embedding)(input_ids)
        if not self.eagle3:
            x = self.fc(torch.cat([embeds, feature], dim=-1))
            h, residual = self.layers[0](positions, x, kv_caches[0], attn_metadata, None)
            out = h + residual
            return out, out
        if feature.shape[-1] != embeds.shape[-1]:
            feature = self.fc(feature)       # the target's layers, the first step only
        layer, residual = self.midlayer, feature
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(feature)], dim=-1)
        x = layer.self_attn(positions, x, kv_caches[0], attn_metadata)
        x, residual = layer.post_attention_layernorm(x, residual)
        return self.norm(layer.mlp(x), residual)

    def draft_tokens(self, hidden: torch.Tensor, target: nn.Module) -> torch.Tensor:
        """Greedy proposals in the target's vocabulary."""
        if not self.eagle3:
            return target.compute_logits(hidden).argmax(dim=-1)
        draft = self.logits_processor(self.lm_head, hidden).argmax(dim=-1)
        return draft + self.d2t[draft]

    @classmethod
    def load(cls, config: Any, spec_config, target_config: Any, dtype: torch.dtype, device: torch.device,
             load_format: str, seed: int) -> "EagleHead":
        eagle3 = spec_config.method == "eagle3"
        weights = {} if load_format == "dummy" else read_checkpoint(spec_config.model)
        aux = None
        if eagle3:
            aux = spec_config.eagle_aux_hidden_state_layer_ids or _config_aux_ids(config)
            n = target_config.num_hidden_layers
            aux = aux or [2, n // 2, n - 3]
            aux = [min(max(i, 0), n - 1) for i in aux]
        head = _build(cls, config, eagle3, aux, "fc.bias" in weights, "embed_tokens.weight" in weights,
                      dtype, device)
        if load_format == "dummy":
            from pagedray.models.loader import init_dummy_weights
            init_dummy_weights(head, seed)
            return head.eval()
        d2t = weights.pop("d2t", None)
        weights.pop("t2d", None)
        if eagle3 and d2t is not None:
            head.d2t.copy_(d2t.to(torch.long))
        loaded = load_packed_weights(head, weights.items(), cls.packed_modules_mapping)
        missing = sorted(set(dict(head.named_parameters())) - loaded)
        if missing:
            raise ValueError(f"speculative_config.model {spec_config.model!r} is missing {missing} for an "
                             f"{spec_config.method} head")
        return head.eval()


def _build(cls, config, eagle3, aux, fc_bias, own_embedding, dtype, device) -> EagleHead:
    from pagedray.models.layers import rotary
    rotary._ROPE_CACHE.clear()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            head = cls(config, eagle3, aux, fc_bias, own_embedding)
    finally:
        torch.set_default_dtype(previous)
        rotary._ROPE_CACHE.clear()
    return head


def _config_aux_ids(config: Any) -> list[int] | None:
    ids = getattr(config, "eagle_aux_hidden_state_layer_ids", None)
    nested = getattr(config, "eagle_config", None)
    if ids is None and isinstance(nested, dict):
        ids = nested.get("eagle_aux_hidden_state_layer_ids")
    return list(ids) if ids else None


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a head: model.safetensors (or shards), else pytorch_model.bin; names without
    a leading "model." (some exports add it)."""
    from pagedray.models.loader import iterate_safetensors
    bin_path = os.path.join(path, "pytorch_model.bin")
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        items = ((n, t[:] if not isinstance(t, torch.Tensor) else t) for n, t in iterate_safetensors(path))
    elif os.path.isfile(bin_path):
        items = torch.load(bin_path, map_location="cpu", weights_only=True).items()
    else:
        raise ValueError(f"speculative_config.model {path!r} has neither *.safetensors nor pytorch_model.bin")
    return {n.removeprefix("model."): t for n, t in items}
