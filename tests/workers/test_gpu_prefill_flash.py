"""The engine with the flash prefill kernel (KernelOptions prefill_backend="triton_flash") against the
same engine with the PyTorch reference prefill: whole prompts, prefix-cache hits, chunked prefill
and mixed steps, with the step's new K/V read from the layer's rotated key (NEW_KV) and from the cache."""
from __future__ import annotations

import random

import pytest
import torch

from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.tiny_models import make_tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
VOCAB = 512


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("flash_e2e"), vocab_size=VOCAB, hidden_size=256,
                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512)


def _generate(path: str, prompts: list[list[int]], **kernel_options):
    from pagedray.cluster import LLM, SamplingParams
    llm = LLM(path, device="cuda", dtype="float16", num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=96,
              enable_prefix_caching=True, kernel_options=kernel_options)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)
        llm.generate([{"prompt_token_ids": prompts[0]}], params, use_tqdm=False)   # caches the shared prefix
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [engine_greedy(o.outputs[0]) for o in outs]
    finally:
        llm.llm_engine.shutdown()   # its weights and cache go back before the next engine is built


@pytest.mark.parametrize("new_kv", [0, 2])
def test_flash_prefill_engine_matches_the_reference_prefill(checkpoint, monkeypatch, new_kv):
    from pagedray.kernels import options, prefill_flash
    monkeypatch.setattr(options, "_current", options.current())   # each LLM below installs its own options
    rng = random.Random(0)
    shared = [rng.randrange(3, VOCAB) for _ in range(48)]
    prompts = [shared + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(20, 60))] for _ in range(4)]
    prompts += [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (200, 33)]   # 200: chunks of <= 96
    calls = []
    real = prefill_flash.paged_prefill
    monkeypatch.setattr(prefill_flash, "paged_prefill",
                        lambda *a, **k: calls.append(k.get("key") is not None) or real(*a, **k))
    got = _generate(checkpoint, prompts, prefill_backend="triton_flash", prefill_variant={"NEW_KV": new_kv})
    assert calls and all(c == bool(new_kv) for c in calls)
    want = _generate(checkpoint, prompts, prefill_backend="reference")
    for i, (ours, ref) in enumerate(zip(got, want, strict=True)):
        assert_greedy_match(ours, ref, atol=2e-2, what=f"prompt {i} vs the reference prefill")
