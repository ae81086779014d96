"""Mixtral's expert loading (the kit covers its outputs vs HF and TP=2 vs TP=1): per-expert
checkpoint tensors are stacked, and a missing or out-of-range expert tensor is named."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from testkit.conformance_kit import build_checkpoint
from testkit.tiny_models import edit_checkpoint

from pagedray.models import get_model
from pagedray.models.layers.moe import DOWN, GATE, UP, FusedMoE, load_weights_with_experts

PREFIX = "model.layers.1.block_sparse_moe.experts"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return build_checkpoint("MixtralForCausalLM", "top2_of_4_sliding", str(tmp_path_factory.mktemp("mixtral")))


@torch.no_grad()
def test_experts_are_stacked_gate_then_up(ckpt):
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    model = get_model(AutoConfig.from_pretrained(ckpt), ckpt, torch.float32, "cpu")
    moe = model.model.layers[1].block_sparse_moe.experts
    assert isinstance(moe, FusedMoE) and moe.w13_weight.shape == (4, 2 * 128, 64)
    torch.testing.assert_close(moe.w13_weight[2], torch.cat([tensors[f"{PREFIX}.2.w1.weight"],
                                                             tensors[f"{PREFIX}.2.w3.weight"]]))
    torch.testing.assert_close(moe.w2_weight[3], tensors[f"{PREFIX}.3.w2.weight"])


@pytest.mark.parametrize("kind", ["missing", "out_of_range"])
def test_bad_expert_tensor_is_named(ckpt, tmp_path, kind):
    name = f"{PREFIX}.2.w3.weight" if kind == "missing" else f"{PREFIX}.4.w1.weight"
    if kind == "missing":
        edit = lambda t: {n: v for n, v in t.items() if n != name}  # noqa: E731
    else:
        edit = lambda t: {**t, name: t[f"{PREFIX}.0.w1.weight"].clone()}  # noqa: E731
    bad = edit_checkpoint(ckpt, tmp_path / kind, edit)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        get_model(AutoConfig.from_pretrained(bad), bad, torch.float32, "cpu")


def test_expert_names_must_cover_every_part():
    with pytest.raises(ValueError, match="expert_names"):
        load_weights_with_experts(torch.nn.Module(), [], {}, {"w1": GATE, "w2": DOWN, "w4": DOWN})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        FusedMoE(num_experts=4, top_k=5, hidden_size=8, intermediate_size=8)
    assert {GATE, UP, DOWN} == {"gate", "up", "down"}


@torch.no_grad()
def test_dense_experts_equal_routed_experts():
    """The graph-capturable dense form gives the routed loop's sum."""
    from pagedray.models.layers.activation import get_act_and_mul_fn
    from pagedray.models.layers.moe import moe_experts_dense, moe_experts_reference, select_experts
    gen = torch.Generator().manual_seed(0)
    x, w13, w2 = (torch.randn(*s, generator=gen) for s in ((7, 16), (4, 2 * 24, 16), (4, 16, 24)))
    weights, ids = select_experts(torch.randn(7, 4, generator=gen), top_k=2)
    act = get_act_and_mul_fn("silu")
    routed = moe_experts_reference(x, w13, w2, weights, ids, act)
    torch.testing.assert_close(moe_experts_dense(x, w13, w2, weights, ids, act), routed, atol=1e-5, rtol=1e-5)
    # Oracle for the routed loop itself: token by token.
    for t in range(7):
        want = sum(weights[t, k] * (act(x[t] @ w13[ids[t, k]].T) @ w2[ids[t, k]].T) for k in range(2))
        torch.testing.assert_close(routed[t], want, atol=1e-5, rtol=1e-5)
