"""EAGLE / EAGLE-3 heads load from their authors' layouts (model.safetensors or pytorch_model.bin,
with or without their own embedding; EAGLE-3 with d2t) and compute what a plain HF-modules reference
computes over the same weights: the hidden states, the next feature and the proposals."""
from __future__ import annotations

import pytest
import torch
from testkit.eagle_heads import make_eagle_head
from testkit.tiny_models import allocate_block_tables, build_attn_metadata, make_tiny_hf_model

from pagedray.common.speculative import SpeculativeConfig
from pagedray.models.eagle import EagleHead, read_checkpoint

BS = 4


@pytest.fixture(scope="module")
def target():
    return make_tiny_hf_model(num_hidden_layers=4)


def _load(path: str, method: str, target_cfg) -> EagleHead:
    from transformers import AutoConfig
    spec = SpeculativeConfig(method, 2, model=path)
    return EagleHead.load(AutoConfig.from_pretrained(path), spec, target_cfg, torch.float32, torch.device("cpu"),
                          "auto", 0)


def _hf_layer(cfg, weights: dict, prefix: str, q_in: int):
    """HF's Llama attention + MLP + norms over the head's checkpoint tensors."""
    from transformers.models.llama import modeling_llama as m
    cfg = type(cfg)(**{**cfg.to_dict(), "num_hidden_layers": 1})
    cfg._attn_implementation = "eager"
    layer = m.LlamaDecoderLayer(cfg, 0).float().eval()
    h = cfg.hidden_size
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(layer.self_attn, name, torch.nn.Linear(q_in, getattr(layer.self_attn, name).out_features,
                                                       bias=False))
    sd = {k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
    sd.pop("hidden_norm.weight", None)
    sd.setdefault("input_layernorm.weight", torch.ones(h))
    layer.load_state_dict(sd)
    return layer, m.LlamaRotaryEmbedding(cfg)


def _ours(head: EagleHead, target_model, ids, feature):
    t = len(ids)
    tables = allocate_block_tables([t], BS)
    meta, positions = build_attn_metadata([t], [t], tables, BS)
    blocks = max(tables[0]) + 1
    cache = [torch.zeros(2, blocks, head.num_kv_heads, BS, head.head_dim)]
    with torch.no_grad():
        return head(torch.tensor(ids), positions, cache, meta, feature, _embedding(target_model))


def _embedding(hf_target):
    """The target's embedding as our model would hold it (same weights)."""
    emb = torch.nn.Embedding(*hf_target.model.embed_tokens.weight.shape)
    emb.weight.data.copy_(hf_target.model.embed_tokens.weight)
    return emb


def _causal(t: int) -> torch.Tensor:
    return torch.full((t, t), float("-inf")).triu(1)[None, None]


@pytest.mark.parametrize("fmt, own", [("safetensors", False), ("bin", True)])
def test_eagle_head_matches_an_hf_reference(tmp_path, target, fmt, own):
    path = make_eagle_head(tmp_path / "eagle", target.config, fmt=fmt, own_embedding=own)
    head = _load(path, "eagle", target.config)
    w = read_checkpoint(path)
    t, h = 7, target.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.config.vocab_size, (t,), generator=gen).tolist()
    feature = torch.randn(t, h, generator=gen)
    out, nxt = _ours(head, target, ids, feature)
    layer, rope = _hf_layer(target.config, w, "layers.0", h)
    emb = w["embed_tokens.weight"] if own else target.model.embed_tokens.weight
    with torch.no_grad():
        x = torch.nn.functional.linear(torch.cat([emb[ids], feature], -1), w["fc.weight"], w["fc.bias"])[None]
        pos = rope(x, torch.arange(t)[None])
        a = layer.self_attn(x, pos, _causal(t))[0]             # no input norm on EAGLE's first layer
        mid = x + a
        ref = (mid + layer.mlp(layer.post_attention_layernorm(mid)))[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert nxt is out      # EAGLE feeds its own output back as the next position's feature


def test_eagle3_head_matches_an_hf_reference_and_maps_its_vocabulary(tmp_path, target):
    path = make_eagle_head(tmp_path / "eagle3", target.config, eagle3=True, draft_vocab_size=160)
    head = _load(path, "eagle3", target.config)
    assert head.aux_layer_ids == [2, 2, 1]                     # vLLM's (2, L/2, L-3) for L = 4
    w = read_checkpoint(path)
    t, h = 6, target.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, target.config.vocab_size, (t,), generator=gen).tolist()
    aux = torch.randn(t, 3 * h, generator=gen)
    normed, prenorm = _ours(head, target, ids, aux)
    layer, rope = _hf_layer(target.config, w, "midlayer", 2 * h)
    eps = target.config.rms_norm_eps

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
    with torch.no_grad():
        f = torch.nn.functional.linear(aux, w["fc.weight"])
        e = target.model.embed_tokens.weight[ids]
        x = torch.cat([rms(e, w["midlayer.input_layernorm.weight"]), rms(f, w["midlayer.hidden_norm.weight"])], -1)
        pos = rope(x, torch.arange(t)[None])
        mid = f + layer.self_attn(x[None], pos, _causal(t))[0][0]
        ref_pre = mid + layer.mlp(layer.post_attention_layernorm(mid))
        ref = rms(ref_pre, w["norm.weight"])
    torch.testing.assert_close(prenorm, ref_pre, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(normed, ref, atol=1e-4, rtol=1e-4)
    # Proposals: argmax over the draft vocabulary, mapped with d2t onto target ids.
    draft = (ref @ w["lm_head.weight"].T).argmax(-1)
    assert head.draft_tokens(normed, None).tolist() == (draft + w["d2t"][draft]).tolist()


def test_a_head_missing_tensors_is_refused(tmp_path, target):
    from safetensors.torch import load_file, save_file
    path = make_eagle_head(tmp_path / "bad", target.config)
    w = load_file(f"{path}/model.safetensors")
    del w["layers.0.mlp.down_proj.weight"]
    save_file(w, f"{path}/model.safetensors")
    with pytest.raises(ValueError, match="down_proj"):
        _load(path, "eagle", target.config)
