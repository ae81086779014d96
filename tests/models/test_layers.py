"""Single-process layer checks: rotary embedding against HF's rope functions, norms, activations."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from pagedray.models.layers.activation import GeluAndMul, SiluAndMul, get_act_and_mul_fn, get_act_fn
from pagedray.models.layers.layernorm import GemmaRMSNorm, RMSNorm
from pagedray.models.layers.rotary import get_rope, rope_config

MAX_POS = 256
HEAD = 32

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 16,
                    "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.5},
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rope_matches_hf(name):
    config = LlamaConfig(hidden_size=HEAD * 4, num_attention_heads=4, max_position_embeddings=MAX_POS,
                         rope_parameters=dict(ROPES[name]))
    base, scaling = rope_config(config)
    rope = get_rope(HEAD, HEAD, MAX_POS, base, rope_scaling=scaling)
    positions = torch.tensor([0, 1, 7, 63, 64, 100, MAX_POS - 1])
    q, k = torch.randn(len(positions), 4 * HEAD), torch.randn(len(positions), 2 * HEAD)
    cos, sin = LlamaRotaryEmbedding(config)(q, positions[None])
    half = HEAD // 2
    torch.testing.assert_close(rope.cos_sin_cache[positions, :half], cos[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(rope.cos_sin_cache[positions, half:], sin[0, :, :half], atol=1e-6, rtol=0)
    ref_q, ref_k = apply_rotary_pos_emb(q.view(1, -1, 4, HEAD), k.view(1, -1, 2, HEAD), cos, sin, unsqueeze_dim=2)
    got_q, got_k = rope(positions, q, k)
    torch.testing.assert_close(got_q, ref_q.reshape(q.shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_k, ref_k.reshape(k.shape), atol=1e-5, rtol=0)


def test_rope_config_reads_old_and_new_shapes():
    old = SimpleNamespace(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 2.0})
    assert rope_config(old) == (5e5, {"type": "linear", "factor": 2.0})
    assert rope_config(SimpleNamespace(rope_theta=1e4, rope_scaling=None)) == (1e4, None)
    new = LlamaConfig(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})
    assert rope_config(new)[0] == 1e4 and rope_config(new)[1]["rope_type"] == "linear"
    # the old "type" key selects the same scaling as "rope_type"
    a = get_rope(16, 16, 32, 1e4, rope_scaling={"type": "linear", "factor": 2.0}).cos_sin_cache
    b = get_rope(16, 16, 32, 1e4, rope_scaling={"rope_type": "linear", "factor": 2.0}).cos_sin_cache
    assert torch.equal(a, b) and not torch.equal(a, get_rope(16, 16, 32, 1e4).cos_sin_cache)


def test_rope_rejects_unknown_type_and_missing_keys():
    with pytest.raises(ValueError, match="longrope.*supported"):
        get_rope(16, 16, 32, 1e4, rope_scaling={"rope_type": "longrope"})
    with pytest.raises(ValueError, match="low_freq_factor"):
        get_rope(16, 16, 32, 1e4, rope_scaling={"rope_type": "llama3", "factor": 8.0})


def test_partial_rotary_and_gptj_layout():
    """rotary_dim < head_size leaves the tail untouched; GPT-J style rotates interleaved pairs."""
    rope = get_rope(16, 8, 32, 1e4, is_neox_style=False)
    positions = torch.tensor([3, 5])
    q, k = torch.randn(2, 2 * 16), torch.randn(2, 16)
    got_q, _ = rope(positions, q, k)
    got_q, q3 = got_q.view(2, 2, 16), q.view(2, 2, 16)
    assert torch.equal(got_q[..., 8:], q3[..., 8:])
    inv = 1.0 / (1e4 ** (torch.arange(0, 8, 2).float() / 8))
    angle = positions[:, None, None].float() * inv  # [2, 1, 4]
    x1, x2 = q3[..., 0:8:2], q3[..., 1:8:2]
    expect = torch.stack([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], -1)
    torch.testing.assert_close(got_q[..., :8], expect.flatten(-2), atol=1e-5, rtol=0)


def test_rms_norm_with_and_without_residual():
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.randn(8)
    x, r = torch.randn(3, 8), torch.randn(3, 8)

    def ref(v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight

    torch.testing.assert_close(norm(x), ref(x))
    out, res = norm(x, r)
    torch.testing.assert_close(res, x + r)
    torch.testing.assert_close(out, ref(x + r))
    gemma = GemmaRMSNorm(8, eps=1e-5)
    gemma.weight.data = norm.weight.data - 1.0
    torch.testing.assert_close(gemma(x), norm(x))


def test_activations():
    x = torch.randn(4, 10)
    torch.testing.assert_close(SiluAndMul()(x), F.silu(x[:, :5]) * x[:, 5:])
    torch.testing.assert_close(GeluAndMul("tanh")(x), F.gelu(x[:, :5], approximate="tanh") * x[:, 5:])
    assert isinstance(get_act_and_mul_fn("silu"), SiluAndMul)
    torch.testing.assert_close(get_act_fn("gelu_pytorch_tanh")(x), F.gelu(x, approximate="tanh"))
    with pytest.raises(ValueError, match="supported"):
        get_act_fn("nope")
    with pytest.raises(ValueError, match="supported"):
        get_act_and_mul_fn("relu")
