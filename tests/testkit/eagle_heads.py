"""Random EAGLE / EAGLE-3 heads in their authors' published layouts (no published weights offline).

EAGLE: config.json (LlamaForCausalLM, 1 layer) + `fc.weight`/`fc.bias` [h, 2h], `layers.0.*` without
`input_layernorm`, optionally `embed_tokens.weight`; as model.safetensors or pytorch_model.bin.
EAGLE-3: config.json (LlamaForCausalLMEagle3, draft_vocab_size) + `midlayer.*` (q/k/v over 2h,
`hidden_norm`), `fc.weight` [h, 3h], `norm.weight`, `lm_head.weight` [draft_vocab, h], `d2t`, `t2d`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch


def _layer(prefix: str, h: int, inter: int, heads: int, kv_heads: int, head_dim: int, q_in: int,
           gen: torch.Generator, input_norm: bool) -> dict[str, torch.Tensor]:
    def rnd(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=gen)
    w = {f"{prefix}.self_attn.q_proj.weight": rnd(heads * head_dim, q_in),
         f"{prefix}.self_attn.k_proj.weight": rnd(kv_heads * head_dim, q_in),
         f"{prefix}.self_attn.v_proj.weight": rnd(kv_heads * head_dim, q_in),
         f"{prefix}.self_attn.o_proj.weight": rnd(h, heads * head_dim),
         f"{prefix}.mlp.gate_proj.weight": rnd(inter, h),
         f"{prefix}.mlp.up_proj.weight": rnd(inter, h),
         f"{prefix}.mlp.down_proj.weight": rnd(h, inter),
         f"{prefix}.post_attention_layernorm.weight": 1 + rnd(h)}
    if input_norm:
        w[f"{prefix}.input_layernorm.weight"] = 1 + rnd(h)
    return w


def make_eagle_head(path: str | Path, target_config, eagle3: bool = False, fmt: str = "safetensors",
                    own_embedding: bool = False, draft_vocab_size: int | None = None, seed: int = 0) -> str:
    """Write a random head for `target_config` (an HF LlamaConfig) into `path`; returns it as a str."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    t = target_config
    h, heads = t.hidden_size, t.num_attention_heads
    kv_heads = t.num_key_value_heads or heads
    head_dim = h // heads
    cfg = {"architectures": ["LlamaForCausalLMEagle3" if eagle3 else "LlamaForCausalLM"], "model_type": "llama",
           "hidden_size": h, "intermediate_size": t.intermediate_size, "num_hidden_layers": 1,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": t.vocab_size,
           "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
           "hidden_act": "silu", "rope_theta": getattr(t, "rope_theta", 10000.0), "tie_word_embeddings": False}
    if eagle3:
        dv = draft_vocab_size or t.vocab_size
        cfg["draft_vocab_size"] = dv
        w = _layer("midlayer", h, t.intermediate_size, heads, kv_heads, head_dim, 2 * h, gen, True)
        w["midlayer.hidden_norm.weight"] = 1 + 0.2 * torch.randn(h, generator=gen)
        w["fc.weight"] = 0.2 * torch.randn(h, 3 * h, generator=gen)
        w["norm.weight"] = 1 + 0.2 * torch.randn(h, generator=gen)
        w["lm_head.weight"] = 0.3 * torch.randn(dv, h, generator=gen)
        # The draft vocabulary: every other target token (d2t maps draft id -> target id - draft id).
        ids = torch.arange(dv) * (t.vocab_size // dv)
        w["d2t"] = ids - torch.arange(dv)
        t2d = torch.zeros(t.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        w["t2d"] = t2d
    else:
        w = _layer("layers.0", h, t.intermediate_size, heads, kv_heads, head_dim, h, gen, False)
        w["fc.weight"] = 0.2 * torch.randn(h, 2 * h, generator=gen)
        w["fc.bias"] = 0.1 * torch.randn(h, generator=gen)
    if own_embedding:
        w["embed_tokens.weight"] = 0.3 * torch.randn(t.vocab_size, h, generator=gen)
    (path / "config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"))
    else:
        torch.save(w, str(path / "pytorch_model.bin"))
    return str(path)
