"""LoRA adapters with speculative decoding on CPU: in a batch mixing two adapters and the base model,
greedy outputs equal LoRA without speculation and PEFT (near-tie rule), for n-gram and draft-model
proposals, with steps serial and overlapped; seeded sampling equals LoRA without speculation.

The base is a sliding-window (3) Mistral, so a continuation depends on the last tokens only: after a
prompt that repeats an earlier context, the n-gram lookup proposes the adapter's own continuation,
and a verification with accepted proposals shows that every one of its rows carries the adapter.
The draft model is the base with adapter "a" merged in and runs without adapters (as in vLLM): "a"
requests then accept every proposal, which shows both that the verification rows carry "a" and that
the drafter adds no adapter on top of its weights.
"""
from __future__ import annotations

import pytest
from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.hf_reference import hf_greedy
from testkit.lora_adapters import load_peft_model, make_peft_adapter
from testkit.tiny_models import load_hf_model, make_tiny_llama

from pagedray.cluster import LLM, LoRARequest, SamplingParams

MAX_TOKENS = 12
K = 3
START = [31, 77, 12, 250, 3, 99, 140, 18, 61]
SHARED = [40, 41, 42, 43, 44, 45, 46, 47, 48]   # one prompt under every adapter (prefix cache keys)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_spec")
    base = make_tiny_llama(root / "base", arch="mistral", sliding_window=3)
    loras = {"a": LoRARequest("a", 1, make_peft_adapter(base, str(root / "a"), seed=1, r=8, alpha=16)),
             "b": LoRARequest("b", 2, make_peft_adapter(base, str(root / "b"), seed=3, r=4, alpha=4,
                                                        targets=["q_proj", "v_proj", "down_proj"]))}
    models = {None: load_hf_model(base), **{n: load_peft_model(base, r.lora_path) for n, r in loras.items()}}
    merged = models["a"].merge_and_unload()   # (the draft: base weights + a's delta, no adapter)
    merged.save_pretrained(str(root / "draft"), safe_serialization=True)
    models["a"] = load_peft_model(base, loras["a"].lora_path)   # (merging changed the PEFT model)
    cases, refs = [], []
    for name, model in models.items():
        first = hf_greedy(model, START, MAX_TOKENS, ignore_eos=True).tokens
        for prompt in (START + first + START[-6:], SHARED):   # the first repeats its own context
            cases.append((prompt, name))
            refs.append(hf_greedy(model, prompt, MAX_TOKENS, ignore_eos=True))
    return base, str(root / "draft"), loras, cases, refs


# (every step with proposals verifies: the random models accept almost none, which would back
# speculation off, cluster/core/spec_backoff.py)
EVERY_STEP = {"backoff_after_failed_steps": 0}


def _spec(method: str, draft: str) -> dict:
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
                **EVERY_STEP}
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": K, **EVERY_STEP}


def _llm(base: str, spec: dict | None, overlap: bool = False, max_loras: int = 2) -> LLM:
    return LLM(base, device="cpu", block_size=4, num_kv_blocks=200, enable_lora=True, max_loras=max_loras,
               speculative_config=spec, async_scheduling=overlap if spec is not None else None)


def _generate(llm: LLM, cases, loras, params):
    return llm.generate([{"prompt_token_ids": p} for p, _ in cases], params, use_tqdm=False,
                        lora_request=[loras[n] if n else None for _, n in cases])


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2, ignore_eos=True)
OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])


@pytest.fixture(scope="module")
def plain(setup):
    """LoRA without speculation: the engine every speculating one must equal."""
    base, _, loras, cases, refs = setup
    outs = _generate(_llm(base, None), cases, loras, GREEDY)
    for (prompt, name), out, ref in zip(cases, outs, refs):
        assert_greedy_match(engine_greedy(out.outputs[0]), ref, what=f"no speculation, adapter {name}")
    return outs


def test_adapters_and_the_repeated_context_matter(setup):
    _, _, _, cases, refs = setup
    tokens = {(tuple(p), n): r.tokens for (p, n), r in zip(cases, refs)}
    assert len({tuple(tokens[(tuple(SHARED), n)]) for n in (None, "a", "b")}) == 3
    for p, n in cases:   # the sliding window: the repeated context is continued as the first time
        if p is not SHARED:
            assert tokens[(tuple(p), n)] == p[len(START):len(START) + MAX_TOKENS], n


@OVERLAP
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_mixed_adapters_equal_lora_without_speculation_and_peft(setup, plain, method, overlap):
    base, draft, loras, cases, refs = setup
    llm = _llm(base, _spec(method, draft), overlap)
    outs = _generate(llm, cases, loras, GREEDY)
    for (prompt, name), out, want, ref in zip(cases, outs, plain, refs):
        mine = engine_greedy(out.outputs[0])
        assert_greedy_match(mine, engine_greedy(want.outputs[0]), what=f"{method} {name} vs no speculation")
        assert_greedy_match(mine, ref, what=f"{method} {name} vs PEFT")
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_accepted_tokens >= 2 * K and llm.llm_engine.executor.worker.runner.spec.num_steps > 0
    assert stats.num_used_blocks == 0
    # An adapter's request alone: its verifications accept proposals (n-gram: of its repeated context;
    # the draft: "a" merged into the base), so rows past the first carried the adapter too.
    name = "a" if method == "draft_model" else "b"
    before = llm.llm_engine.get_stats()
    i = cases.index(next(c for c in cases if c[1] == name and c[0] is not SHARED))
    out = _generate(llm, [cases[i]], loras, GREEDY)[0]
    assert_greedy_match(engine_greedy(out.outputs[0]), refs[i], what=f"{method} {name} alone")
    after = llm.llm_engine.get_stats()
    drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    assert drafted >= K and accepted >= 0.9 * drafted, (accepted, drafted)


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_eagle_heads_over_adapted_targets_are_lossless(setup, plain, tmp_path, method):
    """An EAGLE head reads the target's hidden states, adapter included (EAGLE-3 through hooks on the
    target's layers, which run eagerly under LoRA too): greedy outputs equal LoRA without speculation."""
    from testkit.eagle_heads import make_eagle_head
    from transformers import AutoConfig
    base, _, loras, cases, _ = setup
    head = make_eagle_head(tmp_path / method, AutoConfig.from_pretrained(base), eagle3=method == "eagle3")
    llm = _llm(base, {"method": method, "model": head, "num_speculative_tokens": K, **EVERY_STEP})
    for (_, name), out, want in zip(cases, _generate(llm, cases, loras, GREEDY), plain):
        assert_greedy_match(engine_greedy(out.outputs[0]), engine_greedy(want.outputs[0]),
                            what=f"{method} {name} vs no speculation")
    assert llm.llm_engine.get_stats().spec_num_draft_tokens > 0


@OVERLAP
def test_drafter_cache_of_a_prefix_hit_is_the_adapters(setup, overlap):
    """Prefix caching stays keyed by adapter with a drafter (its cache shares the target's block ids):
    a request of "a" that hits blocks cached by "a" (none of the base's or "b"'s) equals PEFT and still
    accepts every proposal of the "a"-merged draft, so the drafter's K/V of those blocks are valid."""
    base, draft, loras, cases, refs = setup
    llm = _llm(base, _spec("draft_model", draft), overlap)
    shared = [(c, r) for c, r in zip(cases, refs) if c[0] is SHARED]
    _generate(llm, [c for c, _ in shared if c[1] != "a"], loras, GREEDY)
    first = _generate(llm, [c for c, _ in shared if c[1] == "a"], loras, GREEDY)[0]
    before = llm.llm_engine.get_stats()
    again = _generate(llm, [c for c, _ in shared if c[1] == "a"], loras, GREEDY)[0]
    after = llm.llm_engine.get_stats()
    assert first.num_cached_tokens == 0 and again.num_cached_tokens == 8
    ref = next(r for c, r in shared if c[1] == "a")
    assert_greedy_match(engine_greedy(again.outputs[0]), ref, what="a after a prefix hit")
    drafted = after.spec_num_draft_tokens - before.spec_num_draft_tokens
    accepted = after.spec_num_accepted_tokens - before.spec_num_accepted_tokens
    assert drafted >= K and accepted >= 0.9 * drafted, (accepted, drafted)


@OVERLAP
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_seeded_sampling_equals_lora_without_speculation(setup, method, overlap):
    """Seeded requests emit what they emit without speculation; max_loras=1 also makes the scheduler
    keep each step (verifications included) to one adapter (a step of two would fail on the worker)."""
    base, draft, loras, cases, _ = setup
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=10 + i, max_tokens=MAX_TOKENS, ignore_eos=True)
              for i in range(len(cases))]
    want = [list(o.outputs[0].token_ids) for o in _generate(_llm(base, None, max_loras=1), cases, loras, params)]
    llm = _llm(base, _spec(method, draft), overlap, max_loras=1)
    got = [list(o.outputs[0].token_ids) for o in _generate(llm, cases, loras, params)]
    assert got == want
    assert llm.llm_engine.get_stats().spec_num_accepted_tokens > 0


def test_lora_buffers_cover_the_largest_verification_graph(setup):
    """Decode graphs are captured for up to max_num_seqs * (k + 1) rows, here above the token budget: a
    forward of that many rows (as graph capture and its memory profile run) has a LoRA slot per row."""
    from pagedray.workers.cache_engine import CacheEngine
    llm = LLM(setup[0], device="cpu", block_size=4, num_kv_blocks=64, enable_lora=True, max_num_seqs=16,
              max_num_batched_tokens=32, speculative_config=_spec("ngram", ""))
    worker = llm.llm_engine.executor.worker
    rows = 16 * (K + 1)
    worker.runner.profile_run(rows, rows, CacheEngine.empty_caches(worker.kv_spec, worker.device),
                              max_seq_len=llm.llm_engine.model_config.max_model_len)
