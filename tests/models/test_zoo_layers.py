"""Shared layers added for the model zoo: ALiBi slopes, learned positions, the partial-rotary helper."""
from __future__ import annotations

import pytest
import torch

from testkit.tiny_models import allocate_block_tables, build_attn_metadata

from pagedray.models.layers.alibi import alibi_slopes, alibi_slopes_for_rank
from pagedray.models.layers.attention import Attention
from pagedray.models.layers.position_embedding import LearnedPositionalEmbedding
from pagedray.models.layers.rotary import partial_rotary_dim


@pytest.mark.parametrize("heads", [1, 2, 4, 5, 6, 8, 12, 16])
def test_alibi_slopes_match_bloom(heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    # BLOOM's bias is slope * key_pos; at key position 1 it is the slope itself.
    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(alibi_slopes(heads), bloom, atol=1e-7, rtol=0)
    assert torch.equal(alibi_slopes_for_rank(heads), alibi_slopes(heads))  # no group: world size 1


@torch.no_grad()
def test_alibi_attention_matches_bloom_bias():
    """The paged layer with slopes equals softmax(qk^T * scale + slope * key_pos) under a causal mask."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    heads, dim, n = 4, 8, 7
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, heads, dim, generator=gen) for _ in range(3))
    layer = Attention(heads, dim, dim ** -0.5, alibi_slopes=alibi_slopes(heads))
    tables = allocate_block_tables([n], 4)
    meta, _ = build_attn_metadata([n], [n], tables, 4)
    cache = torch.zeros(2, 1 + len(tables[0]), heads, 4, dim)
    got = layer(q.flatten(1), k.flatten(1), v.flatten(1), cache, meta).view(n, heads, dim)
    bias = build_alibi_tensor(torch.ones(1, n), heads, torch.float32).view(heads, 1, n)
    scores = torch.einsum("qhd,khd->hqk", q, k) * dim ** -0.5 + bias
    scores.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(got, torch.einsum("hqk,khd->qhd", scores.softmax(-1), v), atol=1e-5, rtol=0)


def test_alibi_rejects_bad_head_count():
    with pytest.raises(ValueError, match="total_num_heads"):
        alibi_slopes(0)


def test_learned_positions_read_offset_rows():
    emb = LearnedPositionalEmbedding(10, 3, offset=2)
    assert emb.weight.shape == (12, 3)
    with torch.no_grad():
        emb.weight.copy_(torch.arange(36.0).view(12, 3))
    torch.testing.assert_close(emb(torch.tensor([0, 5, 9])), emb.weight[[2, 7, 11]])
    with pytest.raises(ValueError, match="offset"):
        LearnedPositionalEmbedding(10, 3, offset=-1)


def test_partial_rotary_dim_reads_every_config_shape():
    from types import SimpleNamespace as NS
    assert partial_rotary_dim(NS(rope_parameters={"partial_rotary_factor": 0.25}), 16) == 4
    assert partial_rotary_dim(NS(rotary_pct=0.5), 16) == 8
    assert partial_rotary_dim(NS(partial_rotary_factor=0.75), 16) == 12
    assert partial_rotary_dim(NS(), 16) == 16
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        partial_rotary_dim(NS(rotary_pct=1.5), 16)
