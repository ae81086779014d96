"""An FP8 model end to end on the GPU (skipped without a CUDA GPU with FP8 tensor cores).

- decode CUDA graphs equal the eager path (same FP8 kernels at the same shapes);
- an FP8 checkpoint on the GPU (bf16 activations, FP8 kernels) agrees with its dequantized twin in
  HF transformers within the bound of bf16 plus FP8 activation rounding;
- quantization="fp8" and the FP8 checkpoint load and run alike.
"""
from __future__ import annotations

import gc
import random

import pytest
import torch
from testkit.fp8_checkpoints import write_fp8_checkpoint
from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.hf_reference import hf_greedy
from testkit.tiny_models import load_hf_model

from pagedray.kernels.fp8 import has_fp8_tensor_cores

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and has_fp8_tensor_cores()),
                                reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")

VOCAB = 512
SHAPE = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
BOUND = 0.15   # bf16 activations and FP8 activation rounding against fp32 HF on dequantized weights


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for fmt in ("channel", "block"):
        path, ref = tmp_path_factory.mktemp(fmt), tmp_path_factory.mktemp(fmt + "_ref")
        out[fmt] = (write_fp8_checkpoint(path, ref, fmt=fmt, block=(128, 128), **SHAPE), str(ref))
    return out


@pytest.fixture(autouse=True)
def _free_gpu():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


def _generate(path: str, prompts, max_tokens: int = 12, **kwargs):
    from pagedray.cluster import LLM, SamplingParams
    llm = LLM(path, device="cuda", dtype="bfloat16", num_kv_blocks=512, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    graphs = llm.llm_engine.executor.worker.runner.graphs
    replays = graphs.num_replays if graphs is not None else 0
    llm.shutdown()
    return [engine_greedy(o.outputs[0]) for o in outs], replays


@pytest.mark.parametrize("fmt", ["channel", "block"])
def test_fp8_graphs_equal_eager(checkpoints, fmt):
    path, _ = checkpoints[fmt]
    prompts = _prompts(8, seed=1)  # batch 8 (scaled_mm path) shrinking to none; batch 1-4 skinny GEMM
    graphs, replays = _generate(path, prompts)
    eager, _ = _generate(path, prompts, enforce_eager=True)
    assert replays > 0
    for i, (g, e) in enumerate(zip(graphs, eager)):
        assert_greedy_match(g, e, atol=1e-2, tie=1e-2, what=f"{fmt} prompt {i}: graphs vs eager")


@pytest.mark.parametrize("fmt", ["channel", "block"])
def test_fp8_checkpoint_on_gpu_matches_dequantized_hf(checkpoints, fmt):
    path, ref = checkpoints[fmt]
    prompts = _prompts(4, seed=2)
    ours, _ = _generate(path, prompts)
    hf = load_hf_model(ref)
    for i, (p, got) in enumerate(zip(prompts, ours)):
        assert_greedy_match(got, hf_greedy(hf, p, 12, ignore_eos=True), atol=BOUND, tie=BOUND,
                            what=f"{fmt} prompt {i} vs HF on the dequantized weights")


def test_online_fp8_matches_checkpoint_on_gpu(checkpoints):
    path, ref = checkpoints["channel"]
    prompts = _prompts(4, seed=3)
    a, _ = _generate(path, prompts)
    b, _ = _generate(ref, prompts, quantization="fp8")
    for i, (x, y) in enumerate(zip(a, b)):
        assert_greedy_match(x, y, atol=5e-2, tie=5e-2, what=f"prompt {i}: quantization='fp8' vs checkpoint")
