"""End to end on the GPU: the CUDA kernels and decode CUDA graphs against the reference path and HF.

Runs on the GPU machine (skipped where there is no CUDA device). On a machine with
a GPU the CUDA kernels must be usable (CuPy present): a missing kernel fails here.

- fp32: greedy tokens with kernels + graphs equal the CPU reference path's and HF
  transformers' under tests/testkit/hf_compare.py's rule (logprobs within 1e-3), with batches that shrink as requests end
  (graph buckets with padding rows), prefix-cache hits and chunked prefill;
- bf16: graphs equal eager bf16 bit for bit at a bucket batch size (same kernels,
  same shapes), and the graphs were replayed once per decode step;
- memory: KV cache plus graphs stay inside gpu_memory_utilization.
"""
from __future__ import annotations

import gc
import random

import pytest
import torch

from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.hf_reference import hf_greedy
from testkit.tiny_models import load_hf_model, make_tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

VOCAB = 512
# head_dim 64 (as most real models) and a GQA group of 2.
SHAPE = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("gpu_e2e"), **SHAPE)
    return path, load_hf_model(path)


@pytest.fixture(autouse=True)
def _free_gpu():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _prompts(n: int, seed: int, low: int = 3, high: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def _llm(path: str, **kwargs):
    from pagedray.cluster import LLM
    kwargs.setdefault("num_kv_blocks", 512)
    return LLM(path, **kwargs)


def _generate(llm, prompts, max_tokens: list[int]):
    """Greedy per prompt (tests/hf_compare.Greedy: tokens and top-2 logprobs per step)."""
    from pagedray.cluster import SamplingParams
    params = [SamplingParams(temperature=0.0, max_tokens=m, logprobs=2, ignore_eos=True) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [engine_greedy(o.outputs[0]) for o in outs]


def _assert_matches(got, ref, what: str) -> None:
    for i, (ours, want) in enumerate(zip(got, ref, strict=True)):
        assert_greedy_match(ours, want, atol=1e-3, what=f"prompt {i} vs {what}")


def _graphs(llm):
    return llm.llm_engine.executor.worker.runner.graphs


def test_kernels_are_available():
    from pagedray.kernels import cuda_available
    assert cuda_available(), "CUDA device present but the CUDA kernels (CuPy) are not usable"


def test_fp32_graphs_match_cpu_reference_and_hf(checkpoint):
    path, hf_model = checkpoint
    prompts = _prompts(6, seed=0)
    # Requests end at different steps: decode batches 6, 5, ... 1 run in buckets 8, 8, 4, 4, 2, 1.
    max_tokens = [14, 12, 10, 8, 6, 4]
    gpu = _llm(path, device="cuda", dtype="float32", max_num_seqs=8)
    assert _graphs(gpu) is not None and sorted(_graphs(gpu).graphs) == [1, 2, 4, 8]
    got = _generate(gpu, prompts, max_tokens)
    # Every request is prefilled in step 1; each later step is decode-only and replays a graph.
    assert _graphs(gpu).num_replays == max(max_tokens) - 1
    _assert_matches(got, _generate(_llm(path, device="cpu"), prompts, max_tokens), "the CPU reference path")
    _assert_matches(got, [hf_greedy(hf_model, p, m, ignore_eos=True) for p, m in zip(prompts, max_tokens)], "HF")


def test_fp32_prefix_hits_and_chunked_prefill_match_hf(checkpoint):
    """Paged prefill over cached blocks (prefix hits) and over earlier chunks, then graph decode."""
    path, hf_model = checkpoint
    shared = _prompts(1, seed=1, low=40, high=41)[0]        # 2 full blocks of 16 are shared
    prompts = [shared + tail for tail in _prompts(4, seed=2, low=5, high=30)]
    prompts.append(_prompts(1, seed=3, low=100, high=101)[0])   # chunked: 3 chunks of <= 48
    llm = _llm(path, device="cuda", dtype="float32", max_num_seqs=8, max_num_batched_tokens=48,
               enable_prefix_caching=True)
    _generate(llm, prompts[:1], [2])                        # caches the shared blocks
    got = _generate(llm, prompts, [8] * len(prompts))
    assert llm.llm_engine.get_stats().prefix_cache_hit_tokens > 0
    assert _graphs(llm).num_replays > 0
    _assert_matches(got, [hf_greedy(hf_model, p, 8, ignore_eos=True) for p in prompts], "HF")


def test_bf16_graphs_equal_eager_exactly(checkpoint):
    path, _ = checkpoint
    # 8 requests of equal max_tokens: every decode step has batch 8, a bucket, so graph and
    # eager run the same kernels on the same shapes and must agree bit for bit.
    prompts = _prompts(8, seed=4)
    max_tokens = [16] * 8
    graphed = _llm(path, device="cuda", dtype="bfloat16", max_num_seqs=8)
    g = _generate(graphed, prompts, max_tokens)
    assert _graphs(graphed).num_replays == 15
    del graphed
    eager = _llm(path, device="cuda", dtype="bfloat16", max_num_seqs=8, enforce_eager=True)
    assert _graphs(eager) is None
    e = _generate(eager, prompts, max_tokens)
    assert g == e   # the same computation, not a reference: bit for bit, ties included


def test_graph_memory_counted_in_utilization(checkpoint):
    path, _ = checkpoint
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    # What this process and others already hold plus 3 GiB: a tight budget on any card size.
    util = (total - free + 3 * 2**30) / total
    llm = _llm(path, device="cuda", dtype="bfloat16", gpu_memory_utilization=util, num_kv_blocks=None)
    assert _graphs(llm) is not None and len(_graphs(llm).graphs) == 35   # buckets up to 256
    assert llm.llm_engine.num_kv_blocks > 0
    torch.cuda.synchronize()
    assert torch.cuda.memory_reserved() <= util * total
    got = _generate(llm, _prompts(3, seed=5), [4, 4, 4])
    assert all(len(g.tokens) == 4 for g in got)
