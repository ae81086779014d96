"""Bad input raises ValueError naming the field, and leaves the engine serving."""
from __future__ import annotations

import pytest

from testkit.tiny_models import make_tiny_llama

from pagedray.cluster import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = make_tiny_llama(tmp_path_factory.mktemp("bad"), max_position_embeddings=64)
    return LLM(path, device="cpu", block_size=4, num_kv_blocks=40)


@pytest.mark.parametrize("prompt, params, field", [
    ("", SamplingParams(), "prompt"),
    ({"prompt_token_ids": []}, SamplingParams(), "prompt"),
    ({"prompt_token_ids": [1, 2, 320]}, SamplingParams(), "vocabulary"),
    ({"prompt_token_ids": [-1]}, SamplingParams(), "vocabulary"),
    ({"prompt_token_ids": [5] * 64}, SamplingParams(), "max_model_len"),
    ({"prompt_token_ids": [5] * 10}, SamplingParams(max_tokens=60), "max_tokens"),
    # 40 blocks of 4 = 160 tokens, but max_model_len 64 bounds first; use a smaller cache below.
    (12345, SamplingParams(), "prompt"),
])
def test_rejected_and_engine_keeps_serving(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([prompt], params, use_tqdm=False)
    engine = llm.llm_engine
    assert engine.get_stats().num_used_blocks == 0
    assert not engine.has_unfinished_requests()
    out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=3, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    assert engine.get_stats().num_used_blocks == 0


def test_bad_prompt_in_batch_leaves_nothing_queued(llm):
    good = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([good, good, {"prompt_token_ids": [999]}], SamplingParams(max_tokens=3), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.llm_engine.scheduler.num_waiting == 0


def test_max_tokens_beyond_kv_capacity(tmp_path):
    llm = LLM(make_tiny_llama(tmp_path), device="cpu", block_size=4, num_kv_blocks=8)  # 32 tokens
    with pytest.raises(ValueError, match="max_tokens"):
        llm.generate([{"prompt_token_ids": [5] * 20}], SamplingParams(max_tokens=20), use_tqdm=False)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"top_k": -2}, "top_k"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"block_size": 12}, "block_size"), ({"max_model_len": 10_000}, "max_model_len"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"), ({"tensor_parallel_size": 0},
                                                                   "tensor_parallel_size"),
    ({"dtype": "int3"}, "dtype"), ({"load_format": "pickle"}, "load_format"),
])
def test_engine_config_validation(tmp_path, kwargs, field):
    path = make_tiny_llama(tmp_path)
    with pytest.raises(ValueError, match=field):
        LLM(path, device="cpu", **kwargs)
