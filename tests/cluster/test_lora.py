"""Multi-LoRA end to end on CPU against HF transformers + PEFT on a tiny random Llama.

Random adapters (A and B both random: PEFT's B starts at zero) on every linear layer, with
different ranks, alphas and rsLoRA, served side by side with the base model in one batch.
"""
from __future__ import annotations

import random

import pytest
import torch

from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.hf_reference import hf_greedy
from testkit.lora_adapters import load_peft_model, make_peft_adapter
from testkit.tiny_models import load_hf_model, make_tiny_llama

from pagedray.cluster import LLM, LoRARequest, SamplingParams

VOCAB = 320
MAX_TOKENS = 10
# name -> make_peft_adapter keywords
ADAPTERS = {
    "all8": dict(seed=1, r=8, alpha=16),
    "rs16": dict(seed=2, r=16, alpha=8, use_rslora=True),
    "qv4": dict(seed=3, r=4, alpha=4, targets=["q_proj", "v_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = make_tiny_llama(tmp_path_factory.mktemp("base"))
    loras = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        path = make_peft_adapter(base, str(tmp_path_factory.mktemp(name)), **kw)
        loras[name] = LoRARequest(name, i + 1, path)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 23)]
    refs = {None: {tuple(p): hf_greedy(load_hf_model(base), p, MAX_TOKENS, ignore_eos=True) for p in prompts}}
    for name, lora in loras.items():
        model = load_peft_model(base, lora.lora_path)
        refs[name] = {tuple(p): hf_greedy(model, p, MAX_TOKENS, ignore_eos=True) for p in prompts}
    # max_loras=2 < 3 adapters: the scheduler holds back the third and the slots are swapped.
    llm = LLM(base, device="cpu", enable_lora=True, max_loras=2, max_lora_rank=16, block_size=4,
              num_kv_blocks=200)
    return base, loras, prompts, refs, llm


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2, ignore_eos=True)


def test_adapters_change_the_output(setup):
    _, loras, prompts, refs, _ = setup
    for name in loras:   # otherwise matching PEFT would prove nothing about the adapter
        assert any(refs[name][tuple(p)].tokens != refs[None][tuple(p)].tokens for p in prompts), name


def test_mixed_batch_matches_peft_with_more_adapters_than_slots(setup):
    _, loras, prompts, refs, llm = setup
    cases = [(p, name) for p in prompts for name in [None, *loras]]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in cases], _params(), use_tqdm=False,
                        lora_request=[loras[n] if n else None for _, n in cases])
    for (prompt, name), out in zip(cases, outs):
        assert_greedy_match(engine_greedy(out.outputs[0]), refs[name][tuple(prompt)], what=f"{name} {prompt}")
    manager = llm.llm_engine.executor.worker.runner.lora
    assert manager.num_swaps >= 3 and len(manager.slot_of) <= 2
    assert llm.llm_engine.get_stats().num_used_blocks == 0


def test_each_request_alone_matches_the_batch(setup):
    _, loras, prompts, refs, llm = setup
    for name in loras:
        out = llm.generate([{"prompt_token_ids": prompts[1]}], _params(), use_tqdm=False,
                           lora_request=loras[name])[0]
        assert_greedy_match(engine_greedy(out.outputs[0]), refs[name][tuple(prompts[1])], what=name)


def test_prefix_cache_is_keyed_by_adapter(setup):
    _, loras, prompts, _, llm = setup
    prompt = {"prompt_token_ids": list(range(10, 42))}   # 8 full blocks of 4
    params = SamplingParams(temperature=0.0, max_tokens=2)
    first = llm.generate(prompt, params, use_tqdm=False, lora_request=loras["all8"])[0]
    again = llm.generate(prompt, params, use_tqdm=False, lora_request=loras["all8"])[0]
    other = llm.generate(prompt, params, use_tqdm=False, lora_request=loras["rs16"])[0]
    base = llm.generate(prompt, params, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 28
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0


def test_bad_adapters_are_refused(setup, tmp_path):
    base, loras, _, _, llm = setup
    prompt = {"prompt_token_ids": [5, 6, 7]}
    big = make_peft_adapter(base, str(tmp_path / "big"), seed=4, r=32, alpha=32, targets=["q_proj"])
    with pytest.raises(ValueError, match="rank r=32 .*max_lora_rank=16"):
        llm.generate(prompt, use_tqdm=False, lora_request=LoRARequest("big", 10, big))
    other_base = make_tiny_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    foreign = make_peft_adapter(other_base, str(tmp_path / "foreign"), seed=5, r=4, targets=["q_proj"])
    with pytest.raises(ValueError, match="another base model.*hidden_size=32"):
        llm.generate(prompt, use_tqdm=False, lora_request=LoRARequest("foreign", 11, foreign))
    head = make_peft_adapter(base, str(tmp_path / "head"), seed=6, r=4, targets=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"targets \['lm_head'\].*no LoRA layer"):
        llm.generate(prompt, use_tqdm=False, lora_request=LoRARequest("head", 12, head))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.generate(prompt, use_tqdm=False, lora_request=LoRARequest("empty", 13, str(tmp_path)))
    with pytest.raises(ValueError, match="lora_int_id 1 is adapter 'all8'"):
        llm.generate(prompt, use_tqdm=False, lora_request=LoRARequest("x", 1, loras["rs16"].lora_path))
    # Nothing was queued or kept: the engine still serves.
    assert llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    assert llm.llm_engine.get_stats().num_used_blocks == 0


def test_lora_off_refuses_adapters(setup):
    base, loras, _, _, _ = setup
    llm = LLM(base, device="cpu", num_kv_blocks=16)
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        llm.generate({"prompt_token_ids": [5, 6]}, use_tqdm=False, lora_request=loras["all8"])


def test_dense_path_matches_peft(setup):
    """Every forward through the dense GEMMs over all slots (decode steps too; fused with the base
    layer's GEMM), mixed batch, CPU."""
    base, loras, prompts, refs, _ = setup
    llm = LLM(base, device="cpu", enable_lora=True, max_loras=3, max_lora_rank=16, block_size=4,
              num_kv_blocks=200, kernel_options={"lora_dense_min_tokens": 0, "lora_narrow_kernels_min_tokens": 0,
                                                 "lora_narrow_kernels_max_tokens": 0})
    cases = [(p, name) for p in prompts for name in [None, *loras]]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in cases], _params(), use_tqdm=False,
                        lora_request=[loras[n] if n else None for _, n in cases])
    llm.shutdown()
    for (prompt, name), out in zip(cases, outs):
        assert_greedy_match(engine_greedy(out.outputs[0]), refs[name][tuple(prompt)], what=f"dense {name} {prompt}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("paths", [{}, {"lora_dense_min_tokens": 1 << 30},
                                   {"lora_dense_min_tokens": 0, "lora_narrow_kernels_min_tokens": 0,
                                    "lora_narrow_kernels_max_tokens": 0}],
                         ids=["default", "kernels", "dense"])
def test_gpu_kernels_and_graphs_match_peft(setup, paths):
    """On CUDA: the Triton kernels (or the dense GEMMs) in eager prefill and in the replayed decode
    graphs, fp32."""
    base, loras, prompts, refs, _ = setup
    llm = LLM(base, device="cuda", dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=16,
              num_kv_blocks=256, max_num_seqs=8, kernel_options=paths)
    graphs = llm.llm_engine.executor.worker.runner.graphs
    assert graphs is not None
    cases = [(p, name) for p in prompts for name in [None, *loras]]
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in cases], _params(), use_tqdm=False,
                        lora_request=[loras[n] if n else None for _, n in cases])
    assert graphs.num_replays > 0
    llm.shutdown()
    for (prompt, name), out in zip(cases, outs):
        assert_greedy_match(engine_greedy(out.outputs[0]), refs[name][tuple(prompt)], atol=1e-3,
                            what=f"cuda {name} {prompt}")


def test_an_adapter_parses_off_the_step_loop(setup, tmp_path):
    """A core request naming a new adapter waits for its parse while other requests step on; a
    parse that fails refuses the requests that waited for it, and the engine goes on."""
    import threading

    from pagedray.cluster.core.messages import CoreRequest
    base, _, prompts, _, llm = setup
    core = llm.llm_engine.core
    gate = threading.Event()
    real_add = core.executor.add_lora

    def slow_add(lora):
        gate.wait(30)
        return real_add(lora)

    core.executor.add_lora = slow_add
    try:
        fresh = LoRARequest("fresh", 20, make_peft_adapter(base, str(tmp_path / "fresh"), seed=7, r=4))
        bad = LoRARequest("bad", 21, make_peft_adapter(base, str(tmp_path / "bad"), seed=8, r=32))
        params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
        core.add([CoreRequest("base-1", prompts[0], params.clone()),
                  CoreRequest("lora-1", prompts[0], params.clone(), lora_request=fresh),
                  CoreRequest("lora-bad", prompts[0], params.clone(), lora_request=bad)])
        done: dict[str, list] = {}
        for _ in range(6):   # the base request finishes while both adapters are still parsing
            for out in core.step().outputs:
                done.setdefault(out.request_id, []).append(out)
        assert done["base-1"][-1].finish_reason == "length" and "lora-1" not in done
        gate.set()
        while core.has_unfinished_requests():
            for out in core.step().outputs:
                done.setdefault(out.request_id, []).append(out)
        assert sum(len(o.new_token_ids) for o in done["lora-1"]) == 3
        assert "max_lora_rank=16" in done["lora-bad"][-1].error
    finally:
        core.executor.add_lora = real_add
    assert llm.llm_engine.get_stats().num_used_blocks == 0
