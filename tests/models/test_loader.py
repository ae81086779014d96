"""The strict loader, the registry and the KV-cache spec helper."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, LlamaConfig

from testkit.tiny_models import edit_checkpoint, load_hf_model, make_tiny_llama, prefill_logits

from pagedray.models import ModelRegistry, get_kv_cache_spec, get_model
from pagedray.models.layers.weights import materialize, narrow

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def ckpt(tiny_llama) -> str:
    return tiny_llama


def _load(path: str, **kw):
    return get_model(AutoConfig.from_pretrained(path), path, torch.float32, CPU, **kw)


def test_sharded_checkpoint_loads(tmp_path):
    path = make_tiny_llama(tmp_path, tokenizer=False, max_shard_size="100KB")
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
    config = AutoConfig.from_pretrained(path)
    prompt = [3, 14, 15, 92, 65, 35]
    with torch.no_grad():
        expected = load_hf_model(path)(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(prefill_logits(_load(path), config, prompt), expected, atol=1e-4, rtol=0)


def test_missing_weight_is_named(ckpt, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    path = edit_checkpoint(ckpt, tmp_path / "a", lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        _load(path)
    # a wholly absent fused parameter is named by its checkpoint names too
    gone = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.v_proj.weight")
    path = edit_checkpoint(ckpt, tmp_path / "b", lambda t: {k: v for k, v in t.items() if k not in gone})
    with pytest.raises(ValueError, match=r"q_proj.*k_proj.*v_proj"):
        _load(path)
    path = edit_checkpoint(ckpt, tmp_path / "c", lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        _load(path)


def test_unexpected_weight_is_named(ckpt, tmp_path):
    extra = "model.layers.0.self_attn.extra_proj.weight"
    path = edit_checkpoint(ckpt, tmp_path / "x", lambda t: {**t, extra: torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=extra.replace(".", r"\.")):
        _load(path)


def test_ignorable_and_tied_extras_are_accepted(tmp_path):
    path = make_tiny_llama(tmp_path / "tied", tokenizer=False, tie_word_embeddings=True)

    def add(t):
        return {**t, "lm_head.weight": t["model.embed_tokens.weight"].clone(),
                "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}

    edited = edit_checkpoint(path, tmp_path / "tied_extra", add)
    model = _load(edited)
    assert model.lm_head is model.model.embed_tokens
    config = AutoConfig.from_pretrained(path)
    torch.testing.assert_close(prefill_logits(model, config, [5, 6, 7]),
                               prefill_logits(_load(path), config, [5, 6, 7]))


def test_shape_mismatch_names_weight_and_shapes(ckpt, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    path = edit_checkpoint(ckpt, tmp_path / "s", lambda t: {**t, name: torch.zeros(48, 64)})
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*\(48, 64\).*\(32, 64\)"):
        _load(path)
    name = "model.norm.weight"
    path = edit_checkpoint(ckpt, tmp_path / "n", lambda t: {**t, name: torch.zeros(65)})
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*\(65,\).*\(64,\)"):
        _load(path)


def test_unknown_architecture_lists_supported(ckpt):
    config = AutoConfig.from_pretrained(ckpt)
    config.architectures = ["NotARealModelForCausalLM"]
    with pytest.raises(ValueError, match=r"NotARealModelForCausalLM.*LlamaForCausalLM.*MistralForCausalLM"):
        get_model(config, ckpt, torch.float32, CPU)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        ModelRegistry.resolve([])


def test_register_out_of_tree_model(scoped_registry):
    class Toy(torch.nn.Module):
        def __init__(self, config):
            super().__init__()

    ModelRegistry.register_model("ToyForCausalLM", Toy)
    assert "ToyForCausalLM" in ModelRegistry.get_supported_archs()
    assert ModelRegistry.resolve(["Unknown", "ToyForCausalLM"]) is Toy
    assert ModelRegistry.resolve(["MistralForCausalLM"]).__name__ == "MistralForCausalLM"


def test_dummy_load_is_seeded_and_finite(ckpt):
    config = AutoConfig.from_pretrained(ckpt)
    a = prefill_logits(get_model(config, "", torch.float32, CPU, load_format="dummy", seed=0), config, [1, 2, 3])
    b = prefill_logits(get_model(config, "", torch.float32, CPU, load_format="dummy", seed=0), config, [1, 2, 3])
    c = prefill_logits(get_model(config, "", torch.float32, CPU, load_format="dummy", seed=1), config, [1, 2, 3])
    assert torch.isfinite(a).all() and a.abs().max() > 0
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_load_format_and_path(ckpt, tmp_path):
    config = AutoConfig.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="load_format"):
        get_model(config, ckpt, torch.float32, CPU, load_format="pt")
    with pytest.raises(ValueError, match="safetensors"):
        get_model(config, str(tmp_path), torch.float32, CPU)


def test_kv_cache_spec():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
                      architectures=["LlamaForCausalLM"])
    assert get_kv_cache_spec(cfg, 1) == (3, 2, 16)
    assert get_kv_cache_spec(cfg, 2) == (3, 1, 16)
    assert get_kv_cache_spec(cfg, 4) == (3, 1, 16)  # KV heads replicated
    with pytest.raises(ValueError, match="num_attention_heads"):
        get_kv_cache_spec(cfg, 3)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=40,
                      architectures=["MistralForCausalLM"])
    assert get_kv_cache_spec(cfg, 2)[1:] == (2, 40)


def test_narrow_reads_slices_like_tensors(tmp_path):
    t = torch.arange(24.0).view(4, 6)
    save_file({"w": t}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        lazy = f.get_slice("w")
        assert torch.equal(narrow(lazy, 1, 2, 3), narrow(t, 1, 2, 3))
        assert torch.equal(narrow(lazy, 0, 1, 2), t[1:3])
        assert torch.equal(materialize(lazy), t)
