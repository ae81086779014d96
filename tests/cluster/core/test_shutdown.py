"""Shutting an engine down lets its model go: nothing the core still holds (a queued step, a
speculative step whose tokens are read late, the objects start-up froze for the collector) keeps
the weights and KV cache alive, so a process
that builds one engine after another (tests, notebooks, benchmarks) profiles the next one's KV
budget against free memory."""
from __future__ import annotations

import gc
import weakref

import pytest

from testkit.tiny_models import make_tiny_llama

from pagedray.cluster import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"), num_hidden_layers=1)


@pytest.mark.parametrize("speculative_config", [None, NGRAM], ids=["plain", "ngram"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["serial", "overlapped"])
def test_model_is_freed_after_shutdown(model_path, speculative_config, async_scheduling):
    llm = LLM(model_path, device="cpu", block_size=4, async_scheduling=async_scheduling,
              speculative_config=speculative_config)
    worker = llm.llm_engine.core.executor.worker
    worker.runner.cycle = worker.runner   # as the CUDA graph runners' closures make one on a GPU
    model = weakref.ref(worker.runner.model)
    kv = weakref.ref(worker.cache.kv_caches[0])
    prompts = [{"prompt_token_ids": [1, 5, 9, 5, 9, 5, 9, 5]}, {"prompt_token_ids": [3, 4, 3, 4, 3]}]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    llm.shutdown()
    del worker
    gc.collect()
    assert model() is None, "the model outlived the engine's shutdown"
    assert kv() is None, "the KV cache outlived the engine's shutdown"
