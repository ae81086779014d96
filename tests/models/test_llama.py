"""LlamaForCausalLM against HF transformers: prefill over a paged cache, then one decode step."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from testkit.tiny_models import allocate_block_tables, build_attn_metadata, load_hf_model, make_tiny_llama

from pagedray.models import get_kv_cache_spec, get_model

BLOCK_SIZE = 4
ATOL = 1e-4

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "gqa_untied": {},
    "mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
    "head_dim_bias": {"head_dim": 32, "attention_bias": True, "mlp_bias": True, "num_key_value_heads": 1},
    "llama3_rope": {"rope_parameters": LLAMA3_ROPE, "vocab_size": 300},
    "linear_rope": {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}},
    "mistral_sliding": {"arch": "mistral", "sliding_window": 5},
}


@pytest.fixture(scope="module", params=list(CASES))
def models(request, tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp(request.param), tokenizer=False, **CASES[request.param])
    config = AutoConfig.from_pretrained(path)
    ours = get_model(config, path, torch.float32, torch.device("cpu"))
    return ours, load_hf_model(path), config


def _kv_caches(config, num_blocks: int) -> list[torch.Tensor]:
    layers, kv_heads, head_size = get_kv_cache_spec(config, 1)
    return [torch.zeros(2, num_blocks, kv_heads, BLOCK_SIZE, head_size) for _ in range(layers)]


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def test_prefill_then_decode_matches_hf(models):
    ours, hf, config = models
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 8)]
    next_tokens = torch.randint(3, config.vocab_size, (3,), generator=gen).tolist()
    lens = [len(p) for p in prompts]
    tables = allocate_block_tables([n + 1 for n in lens], BLOCK_SIZE)
    caches = _kv_caches(config, 1 + sum(len(t) for t in tables))

    # Prefill: every prompt token's logits.
    meta, positions = build_attn_metadata(lens, lens, tables, BLOCK_SIZE)
    hidden = ours(torch.tensor(sum(prompts, [])), positions, caches, meta)
    assert hidden.shape == (sum(lens), config.hidden_size)
    logits = ours.compute_logits(hidden)
    assert logits.shape == (sum(lens), config.vocab_size) and logits.dtype == torch.float32
    for prompt, got in zip(prompts, logits.split(lens)):
        torch.testing.assert_close(got, _hf_logits(hf, prompt), atol=ATOL, rtol=0)

    # Decode: one new token per sequence, attending through the cache written above.
    meta, positions = build_attn_metadata([n + 1 for n in lens], [1, 1, 1], tables, BLOCK_SIZE)
    logits = ours.compute_logits(ours(torch.tensor(next_tokens), positions, caches, meta))
    for i, (prompt, tok) in enumerate(zip(prompts, next_tokens)):
        torch.testing.assert_close(logits[i], _hf_logits(hf, prompt + [tok])[-1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_profiling_forward_without_cache(models):
    """Empty per-layer caches (the memory-profiling run) attend over the fresh tokens only."""
    ours, hf, config = models
    prompts = [[5, 9, 13, 17, 21, 25, 29], [7, 8, 9]]
    lens = [len(p) for p in prompts]
    meta, positions = build_attn_metadata(lens, lens, allocate_block_tables(lens, BLOCK_SIZE), BLOCK_SIZE)
    meta.slot_mapping.fill_(-1)
    empty = [torch.empty(0) for _ in range(config.num_hidden_layers)]
    logits = ours.compute_logits(ours(torch.tensor(sum(prompts, [])), positions, empty, meta))
    for prompt, got in zip(prompts, logits.split(lens)):
        torch.testing.assert_close(got, _hf_logits(hf, prompt), atol=ATOL, rtol=0)


@torch.no_grad()
def test_chunked_prefill_matches_hf(models):
    """A prompt split over two steps (the second chunk attends to the cached first) equals one pass."""
    ours, hf, config = models
    prompt = list(range(10, 23))
    tables = allocate_block_tables([len(prompt)], BLOCK_SIZE)
    caches = _kv_caches(config, 1 + len(tables[0]))
    for start, end in ((0, 6), (6, len(prompt))):
        meta, positions = build_attn_metadata([end], [end - start], tables, BLOCK_SIZE)
        logits = ours.compute_logits(ours(torch.tensor(prompt[start:end]), positions, caches, meta))
    torch.testing.assert_close(logits, _hf_logits(hf, prompt)[6:], atol=ATOL, rtol=0)
