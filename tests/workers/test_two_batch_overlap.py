"""Two-batch overlap of decode graphs (workers/cuda_graphs.py): which buckets split, and the split
forward against the whole-batch one (on a CPU the halves run one after the other; the two-stream
capture itself is checked in tests/workers/test_gpu_end_to_end.py)."""
from __future__ import annotations

import pytest
import torch

from testkit.tiny_models import allocate_block_tables, build_attn_metadata, make_tiny_llama

from pagedray.common.config import KernelOptions
from pagedray.workers.cuda_graphs import DecodeGraphs, two_batch_forward

BLOCK_SIZE = 4


def test_buckets_split_in_multiples_of_8_from_the_threshold():
    graphs = DecodeGraphs(torch.nn.Identity(), [], [1, 8, 16, 24, 64], 32, BLOCK_SIZE, torch.device("cpu"),
                          two_batch_min=24)
    assert [graphs.split_at(b) for b in (1, 8, 16, 24, 64)] == [0, 0, 0, 8, 32]
    assert DecodeGraphs(torch.nn.Identity(), [], [64], 32, BLOCK_SIZE, torch.device("cpu")).split_at(64) == 0


def test_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="two_batch_overlap_min_batch must be >= 0, got -1"):
        KernelOptions(two_batch_overlap_min_batch=-1)


@torch.no_grad()
def test_split_forward_equals_the_whole_batch(tmp_path):
    from transformers import AutoConfig

    from pagedray.models import get_kv_cache_spec, get_model
    path = make_tiny_llama(tmp_path)
    config = AutoConfig.from_pretrained(path)
    model = get_model(config, path, torch.float32, torch.device("cpu"))
    layers, kv_heads, head = get_kv_cache_spec(config, 1)
    gen = torch.Generator().manual_seed(0)
    lens = [int(n) for n in torch.randint(3, 20, (10,), generator=gen)]
    tables = allocate_block_tables(lens, BLOCK_SIZE)
    num_blocks = 1 + sum(map(len, tables))

    def run(split: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # The same random cache for both runs (the context before this step), then one decode token a sequence.
        caches = [torch.randn(2, num_blocks, kv_heads, BLOCK_SIZE, head, generator=torch.Generator().manual_seed(i))
                  for i in range(layers)]
        ids = torch.arange(len(lens)) * 7 % config.vocab_size
        meta, pos = build_attn_metadata(lens, [1] * len(lens), tables, BLOCK_SIZE)
        if not split:
            return model(ids, pos, caches, meta), caches
        halves = [build_attn_metadata(lens[a:b], [1] * (b - a), tables[a:b], BLOCK_SIZE)[0]
                  for a, b in ((0, split), (split, len(lens)))]
        return two_batch_forward(model, caches, ids, pos, *halves), caches

    whole, whole_caches = run(0)
    split, split_caches = run(4)
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(split_caches, whole_caches):   # each half wrote its own rows' K/V, and only those
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
