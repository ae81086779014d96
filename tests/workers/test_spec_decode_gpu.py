"""Speculative decoding on the GPU: verification steps (and the draft model's steps) replayed from
CUDA graphs give what the same engine gives eagerly, greedy and seeded-sampled, in fp32 (the
hf_compare rule) — and the graphs were in fact replayed. Skipped where there is no CUDA device."""
from __future__ import annotations

import gc

import pytest
import torch
from testkit.eagle_heads import make_eagle_head
from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.tiny_models import make_tiny_llama

from pagedray.cluster import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10] * 3 + [5, 6]},
           {"prompt_token_ids": [31, 77, 12, 250, 3, 99, 140, 18, 61]},
           {"prompt_token_ids": list(range(100, 140))}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoConfig
    root = tmp_path_factory.mktemp("spec_gpu")
    target = make_tiny_llama(root / "target", **SHAPE, num_hidden_layers=4)
    cfg = AutoConfig.from_pretrained(target)
    return (target, make_tiny_llama(root / "draft", seed=3, **SHAPE, num_hidden_layers=1),
            make_eagle_head(root / "eagle", cfg), make_eagle_head(root / "eagle3", cfg, eagle3=True))


@pytest.fixture(autouse=True)
def _free_gpu():
    yield
    gc.collect()
    torch.cuda.empty_cache()


def _run(target: str, cfg: dict, eager: bool, overlap: bool | None = None):
    llm = LLM(target, dtype="float32", block_size=16, max_num_seqs=4, enforce_eager=eager,
              gpu_memory_utilization=0.3, speculative_config=cfg, async_scheduling=overlap)
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2),
                          use_tqdm=False)
    stats = llm.llm_engine.get_stats()     # of the greedy requests
    seeded = llm.generate(PROMPTS, SamplingParams(temperature=0.8, seed=7, max_tokens=32, ignore_eos=True),
                          use_tqdm=False)
    runner = llm.llm_engine.executor.worker.runner
    replays = runner.graphs.num_replays if runner.graphs is not None else 0
    drafter = runner.spec.drafter
    draft_replays = drafter.graphs.num_replays if drafter is not None and drafter.graphs is not None else 0
    llm.shutdown()   # ten engines in a row: each gives its memory back before the next profiles
    return greedy, [list(o.outputs[0].token_ids) for o in seeded], replays, draft_replays, stats


def _config(models, method: str) -> dict:
    target, draft, eagle, eagle3 = models
    # (every step with proposals verifies: the random drafts' fail, which would back speculation off)
    every_step = {"backoff_after_failed_steps": 0}
    return {"ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                      "prompt_lookup_min": 1, **every_step},
            "draft_model": {"method": "draft_model", "model": draft, "num_speculative_tokens": 3, **every_step},
            "draft_identical": {"method": "draft_model", "model": target, "num_speculative_tokens": 4, **every_step},
            "eagle": {"method": "eagle", "model": eagle, "num_speculative_tokens": 3, **every_step},
            "eagle3": {"method": "eagle3", "model": eagle3, "num_speculative_tokens": 3, **every_step}}[method]


@pytest.mark.parametrize("method", ["ngram", "draft_model", "draft_identical", "eagle", "eagle3"])
def test_verification_under_graphs_equals_eager(models, method):
    target, cfg = models[0], _config(models, method)
    g_greedy, g_seeded, replays, draft_replays, stats = _run(target, cfg, eager=False)
    e_greedy, e_seeded, eager_replays, _, _ = _run(target, cfg, eager=True)
    # (EAGLE-3's target runs eagerly: its hooks read target layers, which a replay would skip.)
    assert (replays > 0 or method == "eagle3") and eager_replays == 0
    if method.startswith("draft"):
        assert draft_replays > 0
    assert stats.spec_num_draft_tokens > 0
    if method == "draft_identical":
        assert stats.spec_num_accepted_tokens >= 0.9 * stats.spec_num_draft_tokens   # (fp32 near-ties aside)
    for g, e in zip(g_greedy, e_greedy):
        assert_greedy_match(engine_greedy(g.outputs[0]), engine_greedy(e.outputs[0]), atol=1e-3,
                            what=f"{method}: graphs vs eager")
    # Seeded sampling: the same draws where the greedy tokens agree (fp32: no near-ties expected).
    assert g_seeded == e_seeded


@pytest.mark.parametrize("method", ["ngram", "draft_model", "eagle"])
def test_overlapped_steps_equal_serial_steps_under_graphs(models, method):
    """Async scheduling with speculation (placeholders for the proposals in flight, the workers'
    own proposals read when the next step's inputs are built) gives the serial loop's tokens."""
    target, cfg = models[0], _config(models, method)
    o_greedy, o_seeded, replays, _, stats = _run(target, cfg, eager=False, overlap=True)
    s_greedy, s_seeded, _, _, _ = _run(target, cfg, eager=False, overlap=False)
    assert (replays > 0) and stats.spec_num_draft_tokens > 0
    for o, s in zip(o_greedy, s_greedy):
        assert_greedy_match(engine_greedy(o.outputs[0]), engine_greedy(s.outputs[0]), atol=1e-3,
                            what=f"{method}: overlapped vs serial")
    assert o_seeded == s_seeded


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_structured_outputs_under_graphs_equal_no_speculation(models, method):
    """A grammar's mask at each verified position (overlapped steps by default for the draft model):
    greedy constrained outputs equal the engine's without speculation, and parse."""
    import json

    from pagedray.common.sampling_params import StructuredOutputsParams as SO
    schema = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{0,7}$"},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    params = [SamplingParams(temperature=0, max_tokens=48, logprobs=2, structured_outputs=so)
              for so in (SO(json=schema), SO(regex=r"(ab )+cd"))]
    prompts = ["The capital of France is", "Hello, my name is"]
    kw = dict(dtype="float32", block_size=16, max_num_seqs=4, gpu_memory_utilization=0.3)
    plain = LLM(models[0], **kw)
    want = plain.generate(prompts, params, use_tqdm=False)
    plain.shutdown()
    llm = LLM(models[0], **kw, speculative_config=_config(models, method))
    got = llm.generate(prompts, params, use_tqdm=False)
    assert llm.llm_engine.get_stats().spec_num_draft_tokens > 0
    llm.shutdown()
    for g, w in zip(got, want):
        assert_greedy_match(engine_greedy(g.outputs[0]), engine_greedy(w.outputs[0]), atol=1e-3,
                            what=f"{method}: grammar, speculation vs none")
    json.loads(got[0].outputs[0].text)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_lora_verification_under_graphs_equals_eager(models, tmp_path, method):
    """LoRA adapters with speculation (n-gram serial; the draft model, adapter-free, overlapped by
    default here), a batch of two adapters and none: verification steps replayed from graphs (the LoRA
    slot map set for every row of the bucket) equal eager, greedy and seeded. Graphs go up to
    max_num_seqs * (k + 1) = 256 rows, above the 128-token budget."""
    from testkit.lora_adapters import make_peft_adapter

    from pagedray.cluster import LoRARequest
    target = models[0]
    loras = [None, LoRARequest("a", 1, make_peft_adapter(target, str(tmp_path / "a"), seed=1, r=8, alpha=16)),
             LoRARequest("b", 2, make_peft_adapter(target, str(tmp_path / "b"), seed=2, r=16, alpha=8,
                                                   use_rslora=True))]
    prompts = [p for p in PROMPTS for _ in loras]
    lora_requests = loras * len(PROMPTS)

    def run(eager: bool):
        llm = LLM(target, dtype="float32", block_size=16, max_num_seqs=64, max_num_batched_tokens=128,
                  enforce_eager=eager, gpu_memory_utilization=0.3, enable_lora=True, max_loras=2,
                  speculative_config=_config(models, method))
        greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2),
                              use_tqdm=False, lora_request=lora_requests)
        seeded = llm.generate(prompts, SamplingParams(temperature=0.8, seed=7, max_tokens=32, ignore_eos=True),
                              use_tqdm=False, lora_request=lora_requests)
        runner = llm.llm_engine.executor.worker.runner
        replays = runner.graphs.num_replays if runner.graphs is not None else 0
        stats, steps = llm.llm_engine.get_stats(), runner.spec.num_steps
        llm.shutdown()
        return greedy, [list(o.outputs[0].token_ids) for o in seeded], replays, stats, steps

    g_greedy, g_seeded, replays, stats, steps = run(eager=False)
    e_greedy, e_seeded, eager_replays, _, _ = run(eager=True)
    assert replays > 0 and eager_replays == 0 and steps > 0 and stats.spec_num_draft_tokens > 0
    for i, (g, e) in enumerate(zip(g_greedy, e_greedy)):
        assert_greedy_match(engine_greedy(g.outputs[0]), engine_greedy(e.outputs[0]), atol=1e-3,
                            what=f"LoRA {lora_requests[i] and lora_requests[i].lora_name} + {method}: graphs vs eager")
    assert g_seeded == e_seeded
    # (the adapters matter: otherwise equal outputs would prove nothing about the slot map)
    assert g_greedy[1].outputs[0].token_ids != g_greedy[0].outputs[0].token_ids


def test_backed_off_overlapped_steps_under_graphs_equal_no_speculation(models):
    """n-gram proposals that always fail, overlapped, with the default back-off: most steps are paused
    ones, which (greedy without logprobs: argmax only) start before the last step is read, their input
    tokens gathered on the device from its argmax (workers/spec_decode/inputs.py), and replay the
    decode graphs. Their tokens equal those of the same requests with logprobs (read at every step),
    which equal the engine's without speculation; seeded ones equal it too."""
    from pagedray.workers.spec_decode.runner import Drafts
    target = models[0]
    kw = dict(dtype="float32", block_size=16, max_num_seqs=4, gpu_memory_utilization=0.3)
    with_lp = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=2)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=48, ignore_eos=True)
    llm = LLM(target, **kw)
    plain = llm.generate(PROMPTS, with_lp, use_tqdm=False)
    plain_seeded = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, seeded, use_tqdm=False)]
    llm.shutdown()
    cfg = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    llm = LLM(target, **kw, speculative_config=cfg, async_scheduling=True)
    spec = llm.llm_engine.executor.worker.runner.spec
    spec._ngram = lambda runner, groups: Drafts([g[0] for g in groups], lists=[[1, 1, 1] for _ in groups])
    deferred = []
    can_defer = spec._can_defer
    spec._can_defer = lambda pending, sched: deferred.append(can_defer(pending, sched)) or deferred[-1]
    ours_lp = llm.generate(PROMPTS, with_lp, use_tqdm=False)
    assert not any(deferred)   # (logprobs: every step is read before the next starts)
    ours = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True), use_tqdm=False)
    ours_seeded = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, seeded, use_tqdm=False)]
    stats, replays = llm.llm_engine.get_stats(), llm.llm_engine.executor.worker.runner.graphs.num_replays
    llm.shutdown()
    for o, lp, p in zip(ours, ours_lp, plain):
        assert_greedy_match(engine_greedy(lp.outputs[0]), engine_greedy(p.outputs[0]), atol=1e-3,
                            what="backed off, overlapped, graphs")
        assert list(o.outputs[0].token_ids) == list(lp.outputs[0].token_ids)
    assert ours_seeded == plain_seeded
    assert stats.spec_num_backed_off_steps > 0 and sum(deferred) > 20 and replays > 0
