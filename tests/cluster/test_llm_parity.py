"""End to end on CPU: the offline API against HF transformers on tiny random Llamas."""
from __future__ import annotations

import random

import pytest

from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.hf_reference import hf_greedy
from testkit.tiny_models import load_hf_model, make_tiny_llama

from pagedray.cluster import LLM, SamplingParams

VOCAB = 320


VARIANTS = {
    "gqa_untied": {},
    "mha_tied": {"num_key_value_heads": 4, "tie_word_embeddings": True},
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    return path, load_hf_model(path)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def _check_against_hf(llm: LLM, hf_model, prompts: list[list[int]], max_tokens: int = 12) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        got = out.outputs[0]
        assert_greedy_match(engine_greedy(got), hf_greedy(hf_model, prompt, max_tokens), what=f"prompt {prompt}")
        # vLLM's order: reaching max_tokens reports "length" even when that token is eos.
        assert got.finish_reason == ("length" if len(got.token_ids) == max_tokens else "stop")


def test_greedy_matches_hf_batch(checkpoint):
    path, hf_model = checkpoint
    llm = LLM(path, device="cpu")
    _check_against_hf(llm, hf_model, _prompts(6))
    assert llm.llm_engine.get_stats().num_used_blocks == 0


def test_preemption_gives_identical_outputs(checkpoint):
    path, hf_model = checkpoint
    # 6 prompts of up to ~50 tokens in 4-token blocks cannot all fit in 30 blocks.
    llm = LLM(path, device="cpu", block_size=4, num_kv_blocks=30)
    _check_against_hf(llm, hf_model, _prompts(6, seed=1), max_tokens=16)
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.num_used_blocks == 0


def test_chunked_prefill_under_small_budget(checkpoint):
    path, hf_model = checkpoint
    llm = LLM(path, device="cpu", max_num_batched_tokens=16, block_size=8)
    prompts = _prompts(4, seed=2) + [[5 + i % 300 for i in range(70)]]
    _check_against_hf(llm, hf_model, prompts)


def test_prefix_cache_hits(checkpoint):
    path, hf_model = checkpoint
    llm = LLM(path, device="cpu", block_size=4)
    shared = list(range(10, 34))  # 6 full blocks
    prompts = [shared + [40 + i, 50 + i] for i in range(4)]
    _check_against_hf(llm, hf_model, prompts[:1])
    before = llm.llm_engine.scheduler.block_manager.prefix_cache_hit_tokens
    _check_against_hf(llm, hf_model, prompts[1:])
    hits = llm.llm_engine.scheduler.block_manager.prefix_cache_hit_tokens - before
    assert hits >= 3 * len(shared)


def test_text_prompts_and_output_order(checkpoint):
    path, _ = checkpoint
    llm = LLM(path, device="cpu")
    prompts = ["The capital of France is", "Hello, my name is", "Once upon a time"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    tok = llm.get_tokenizer()
    for prompt, out in zip(prompts, outs):
        assert out.prompt == prompt
        assert out.prompt_token_ids == tok.encode(prompt)
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
