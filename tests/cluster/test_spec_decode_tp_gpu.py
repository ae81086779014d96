"""Speculative decoding with a drafter at tensor_parallel_size=2 on two GPUs (NCCL, CUDA graphs on):
the drafter sharded with the target gives the greedy output of TP=1 without speculation (fp32, the
hf_compare rule), and a draft of the target's own weights is accepted. Skipped without 2 CUDA devices;
the CPU version (gloo) is tests/cluster/test_ray_executor.py::test_tp2_with_a_drafter_matches_tp1."""
from __future__ import annotations

import pytest
import torch

# Before Ray: this module sets the variables Ray reads at import (traffic on 127.0.0.1).
from testkit.ray_engine_cases import ray_local  # noqa: F401

from testkit.eagle_heads import make_eagle_head
from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.tiny_models import make_tiny_llama

from pagedray.cluster import LLM, SamplingParams

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10] * 3 + [5, 6]},
           {"prompt_token_ids": [31, 77, 12, 250, 3, 99, 140, 18, 61]},
           {"prompt_token_ids": list(range(100, 140))}]
KW = dict(dtype="float32", block_size=16, max_num_seqs=4, gpu_memory_utilization=0.3)
GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("target"), **SHAPE, num_hidden_layers=4)


def _greedy(llm: LLM):
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        return [engine_greedy(o.outputs[0]) for o in outs], llm.llm_engine.get_stats()
    finally:
        llm.shutdown()


@pytest.mark.parametrize("method", ["draft_identical", "eagle", "eagle3"])
def test_tp2_drafter_under_graphs_matches_tp1(target, method, tmp_path):
    from transformers import AutoConfig
    model = target if method == "draft_identical" else make_eagle_head(
        tmp_path / method, AutoConfig.from_pretrained(target), eagle3=method == "eagle3")
    spec = {"method": "draft_model" if method == "draft_identical" else method, "model": model,
            "num_speculative_tokens": 3, "backoff_after_failed_steps": 0}   # (every step verifies)
    plain, _ = _greedy(LLM(target, **KW))
    tp2, stats = _greedy(LLM(target, executor="ray", tensor_parallel_size=2, speculative_config=spec, **KW))
    for i, (got, want) in enumerate(zip(tp2, plain, strict=True)):
        assert_greedy_match(got, want, atol=1e-3, what=f"{method} prompt {i}: TP=2 speculative vs TP=1")
    assert stats.spec_num_draft_tokens > 0
    if method == "draft_identical":
        assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens   # (fp32 near-ties aside)
