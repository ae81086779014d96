"""FP8 KV cache (kv_cache_dtype="fp8"): e4m3 values with per-tensor scales, on the reference path.

- the cache write stores e4m3(x / scale) and attention reads value * scale: the paged reference
  over an FP8 cache equals plain attention over K/V rounded the same way;
- a block of the same bytes holds twice the tokens;
- the engine with an FP8 cache stays within a stated bound of the 16/32-bit cache's logprobs;
- a checkpoint's k_scale / v_scale are loaded (llm-compressor's names); on a GPU it is a clear error.
"""
from __future__ import annotations

import json

import pytest
import torch
from testkit.fp8_checkpoints import write_fp8_checkpoint
from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.tiny_models import allocate_block_tables, make_tiny_llama

from pagedray.cluster import LLM, SamplingParams
from pagedray.kernels import reference
from pagedray.workers.cache_engine import KVCacheSpec, kv_cache_torch_dtype

FP8 = torch.float8_e4m3fn



def _rounded(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x / scale).clamp(-448, 448).to(FP8).float() * scale


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.05, 0.02)])
def test_paged_reference_over_fp8_cache_equals_attention_on_rounded_kv(scales):
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, d, bs = 4, 2, 16, 4
    seq_lens, query_lens = [7, 5], [3, 5]
    tables = allocate_block_tables(seq_lens, bs)
    nblocks = 1 + sum(map(len, tables))
    k_cache = torch.zeros(nblocks, kv_heads, bs, d, dtype=FP8)
    v_cache = torch.zeros_like(k_cache)
    keys = [torch.randn(n, kv_heads, d, generator=gen) * 3 for n in seq_lens]
    vals = [torch.randn(n, kv_heads, d, generator=gen) for n in seq_lens]
    for i, n in enumerate(seq_lens):
        slots = torch.tensor([tables[i][p // bs] * bs + p % bs for p in range(n)])
        reference.reshape_and_cache(keys[i], vals[i], k_cache, v_cache, slots, *scales)
    query = torch.randn(sum(query_lens), heads, d, generator=gen)
    table_t = torch.tensor([t + [0] * (max(map(len, tables)) - len(t)) for t in tables], dtype=torch.int32)
    got = reference.paged_attention(query, k_cache, v_cache, table_t, seq_lens, query_lens, d ** -0.5,
                                    k_scale=scales[0], v_scale=scales[1])
    start = 0
    for i, q_len in enumerate(query_lens):
        want = reference.attend(query[start:start + q_len], _rounded(keys[i], scales[0]),
                                _rounded(vals[i], scales[1]), d ** -0.5)
        torch.testing.assert_close(got[start:start + q_len], want)
        start += q_len


def test_fp8_block_holds_twice_the_tokens():
    bf16 = KVCacheSpec(32, 8, 128, 16, torch.bfloat16)
    fp8 = KVCacheSpec(32, 8, 128, 16, kv_cache_torch_dtype("fp8", torch.bfloat16, torch.device("cpu")))
    assert fp8.dtype == FP8 and 2 * fp8.bytes_per_block == bf16.bytes_per_block


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the check is for CUDA devices")
def test_fp8_cache_on_gpu_needs_a_16_bit_model():
    with pytest.raises(ValueError, match="needs a float16 or bfloat16 model"):
        kv_cache_torch_dtype("fp8", torch.float32, torch.device("cuda"))


def test_kv_cache_dtype_is_validated(tmp_path):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(make_tiny_llama(tmp_path, tokenizer=False), device="cpu", kv_cache_dtype="int8")


def _greedy(path: str, **kw) -> list:
    llm = LLM(path, device="cpu", block_size=4, num_kv_blocks=256, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=2, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in ([5, 17, 42, 9, 100, 7], [250, 3, 77, 12])],
                        params, use_tqdm=False)
    return llm, [engine_greedy(o.outputs[0]) for o in outs]


def test_engine_with_fp8_cache_equals_fp32_cache_of_rounded_kv(tmp_path, monkeypatch):
    """The reference of the whole engine: an fp32 cache whose K/V are rounded through e4m3 as they
    are written computes the same attention, so the two engines agree to fp32 rounding. (Against
    the unrounded fp32 cache the tiny random model's logprobs move by up to ~0.5 with the same tokens.)"""
    path = make_tiny_llama(tmp_path)
    llm, fp8 = _greedy(path, kv_cache_dtype="fp8")
    assert all(c.dtype == FP8 for c in llm.llm_engine.executor.worker.cache.kv_caches)
    write = reference.reshape_and_cache
    monkeypatch.setattr(reference, "reshape_and_cache", lambda k, v, kc, vc, slots, ks=1.0, vs=1.0: write(
        _rounded(k.float(), ks), _rounded(v.float(), vs), kc, vc, slots, ks, vs))
    _, rounded = _greedy(path)
    for a, b in zip(fp8, rounded):
        assert_greedy_match(a, b, what="fp8 KV cache vs fp32 cache of e4m3-rounded K/V")


def test_checkpoint_kv_scales_are_loaded(tmp_path):
    """llm-compressor's kv_cache_scheme: `k_proj.output_scale` / `v_proj.output_scale` per layer."""
    from safetensors.torch import load_file, save_file
    path = write_fp8_checkpoint(tmp_path / "ckpt", tmp_path / "ref")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                     "dynamic": False, "symmetric": True}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(f"{path}/model.safetensors")
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.k_proj.output_scale"] = torch.tensor([0.02 * (layer + 1)])
        tensors[f"model.layers.{layer}.self_attn.v_proj.output_scale"] = torch.tensor([0.01])
    save_file(tensors, f"{path}/model.safetensors")
    llm, _ = _greedy(path, kv_cache_dtype="fp8")
    model = llm.llm_engine.executor.worker.runner.model
    assert [layer.self_attn.attn.kv_scales for layer in model.model.layers] == [
        pytest.approx((0.02, 0.01)), pytest.approx((0.04, 0.01))]
