"""Speculative decoding end to end on tiny random Llamas (CPU): lossless against the engine without
speculation and HF, for every proposer; the sampled distribution is the target's (two-sample test);
seeds, mixed batches, preemption, migration, n > 1, logprobs, stop strings and bad configs."""
from __future__ import annotations

import json

import pytest
import torch
from testkit.eagle_heads import make_eagle_head
from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.hf_reference import hf_greedy
from testkit.tiny_models import load_hf_model, make_tiny_llama

from pagedray.cluster import LLM, SamplingParams
from pagedray.cluster.core.engine_core import EngineCore
from pagedray.cluster.core.messages import CoreRequest

# A repetitive prompt (n-gram lookups find matches) and an arbitrary one.
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10] * 3 + [5, 6]},
           {"prompt_token_ids": [31, 77, 12, 250, 3, 99, 140, 18, 61]}]
# Every test here verifies proposals at every step they are made: the tiny random models accept
# almost none, which would back speculation off after a few steps (cluster/core/spec_backoff.py,
# tested in test_spec_backoff.py).
EVERY_STEP = {"backoff_after_failed_steps": 0}
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3, **EVERY_STEP}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("target"), num_hidden_layers=4)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """A smaller draft of the same vocabulary (different weights: some proposals are rejected)."""
    return make_tiny_llama(tmp_path_factory.mktemp("draft"), seed=7, num_hidden_layers=1)


@pytest.fixture(scope="module")
def heads(tmp_path_factory, target):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(target)
    root = tmp_path_factory.mktemp("heads")
    return {"eagle": make_eagle_head(root / "eagle", cfg),
            "eagle_bin": make_eagle_head(root / "eagle_bin", cfg, fmt="bin", own_embedding=True),
            "eagle3": make_eagle_head(root / "eagle3", cfg, eagle3=True, draft_vocab_size=160)}


@pytest.fixture(scope="module")
def base(target):
    return LLM(target, device="cpu", block_size=4)


def _spec_configs(target, draft, heads) -> dict[str, dict]:
    k = {"num_speculative_tokens": 3, **EVERY_STEP}
    return {"ngram": NGRAM,
            "draft_model": {"method": "draft_model", "model": draft, **k},
            "draft_identical": {"method": "draft_model", "model": target, **k},
            "eagle": {"method": "eagle", "model": heads["eagle"], **k},
            "eagle_bin": {"method": "eagle", "model": heads["eagle_bin"], **k},
            "eagle3": {"method": "eagle3", "model": heads["eagle3"], **k}}


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def _completions(llm: LLM, prompts, params) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]


def _assert_nothing_held(llm: LLM) -> None:
    stats = llm.llm_engine.get_stats()
    assert (stats.num_used_blocks, stats.num_running, stats.num_waiting) == (0, 0, 0)


# Every behaviour below holds with steps overlapped (async scheduling: the next step is scheduled
# with placeholders for the proposals before this one's tokens are read) and without.
OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)


@OVERLAP
@pytest.mark.parametrize("method", ["ngram", "draft_model", "draft_identical", "eagle", "eagle_bin", "eagle3"])
def test_greedy_equals_the_engine_without_speculation_and_hf(target, draft, heads, base, method, overlap):
    llm = LLM(target, device="cpu", block_size=4, async_scheduling=overlap,
              speculative_config=_spec_configs(target, draft, heads)[method])
    ours = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    plain = base.generate(PROMPTS, GREEDY, use_tqdm=False)
    hf = load_hf_model(target)
    for prompt, o, p in zip(PROMPTS, ours, plain):
        mine = engine_greedy(o.outputs[0])
        assert_greedy_match(mine, engine_greedy(p.outputs[0]), what=f"{method} vs no speculation")
        assert_greedy_match(mine, hf_greedy(hf, prompt["prompt_token_ids"], 24, ignore_eos=True),
                            what=f"{method} vs HF")
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_draft_tokens > 0 and runner_spec_steps(llm) > 0
    if method == "draft_identical":   # the draft is the target: every proposal is accepted
        assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
    _assert_nothing_held(llm)


def runner_spec_steps(llm: LLM) -> int:
    return llm.llm_engine.executor.worker.runner.spec.num_steps


@OVERLAP
def test_ngram_is_accepted_on_repeated_text(tmp_path, overlap):
    """A sliding window of 3 makes a continuation depend on the last few tokens only: after a prompt
    that repeats an earlier context, the n-gram lookup proposes exactly the target's continuation."""
    model = make_tiny_llama(tmp_path / "window", arch="mistral", sliding_window=3)
    cfg = dict(NGRAM, prompt_lookup_max=4)
    llm = LLM(model, device="cpu", block_size=4, speculative_config=cfg, async_scheduling=overlap)
    plain = LLM(model, device="cpu", block_size=4)
    p = PROMPTS[1]["prompt_token_ids"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    first = _tokens(plain, {"prompt_token_ids": p}, sp)[0]
    repeated = {"prompt_token_ids": p + first + p[-6:]}
    assert _tokens(llm, repeated, sp)[0] == _tokens(plain, repeated, sp)[0] == first
    stats = llm.llm_engine.get_stats()
    # (Overlapped, a step whose lookup found fewer than k verifies those; the driver, which scheduled
    # k placeholders, counts the missing ones as rejected.)
    assert stats.spec_num_accepted_tokens > 12
    assert overlap or stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens
    assert sum(stats.spec_num_accepted_tokens_per_pos) == stats.spec_num_accepted_tokens


# -- the sampled distribution ----------------------------------------------------------------------
def _chi2_two_sample(a: list[int], b: list[int], min_count: int = 10) -> float:
    """p-value of the chi-square test that two samples of categories share one distribution
    (categories with fewer than `min_count` samples in both together are pooled)."""
    cats = sorted(set(a) | set(b))
    ca = {c: 0 for c in cats}
    cb = dict(ca)
    for x in a:
        ca[x] += 1
    for x in b:
        cb[x] += 1
    rows, pool = [], [0, 0]
    for c in cats:
        if ca[c] + cb[c] < min_count:
            pool[0] += ca[c]
            pool[1] += cb[c]
        else:
            rows.append((ca[c], cb[c]))
    if sum(pool) >= min_count:
        rows.append(tuple(pool))
    na, nb = len(a), len(b)
    stat = 0.0
    for x, y in rows:
        tot = x + y
        ea, eb = tot * na / (na + nb), tot * nb / (na + nb)
        stat += (x - ea) ** 2 / ea + (y - eb) ** 2 / eb
    dof = max(1, len(rows) - 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """One layer and 64 tokens: dense histograms from few samples, a fast CPU forward."""
    return make_tiny_llama(tmp_path_factory.mktemp("small"), num_hidden_layers=1, vocab_size=64,
                           initializer_range=0.4)


N_SAMPLES = 1500


def _samples(model: str, params: list[SamplingParams], seed: int, spec: dict | None = None,
             overlap: bool = False) -> list[list[int]]:
    llm = LLM(model, device="cpu", block_size=4, max_num_seqs=1024, seed=seed, speculative_config=spec,
              async_scheduling=overlap)
    got = _tokens(llm, [{"prompt_token_ids": [31, 7, 12, 50, 3, 9, 40, 18, 61]}] * len(params), params)
    if spec is not None:
        stats = llm.llm_engine.get_stats()
        assert 0 < stats.spec_num_accepted_tokens < stats.spec_num_draft_tokens   # both outcomes occur
    return got


@OVERLAP
def test_sampling_is_lossless_two_sample_test(small_vocab, overlap):
    """N_SAMPLES draws of tokens 2-3 with and without speculation, for plain sampling and for every
    logits processor together: the same distributions (chi-square, p > 1e-3; seeds are fixed, so the
    test is deterministic). The draft is the target itself, whose greedy proposals are often but
    not always accepted."""
    kinds = [SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.0),
             SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.02,
                            repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1)]
    params = [kinds[i % 2] for i in range(2 * N_SAMPLES)]
    spec = {"method": "draft_model", "model": small_vocab, "num_speculative_tokens": 2, **EVERY_STEP}
    got = _samples(small_vocab, params, 1, spec, overlap)
    ref = _samples(small_vocab, params, 2)
    for kind in (0, 1):
        a, b = got[kind::2], ref[kind::2]
        for pos in (1, 2):   # token 1 comes from the prefill, before any proposal
            p = _chi2_two_sample([t[pos] for t in a], [t[pos] for t in b])
            assert p > 1e-3, f"params {kind}, position {pos}: p = {p:.2e}"
        # The pair jointly, which a wrong conditional would distort.
        p = _chi2_two_sample([t[1] * 1000 + t[2] for t in a], [t[1] * 1000 + t[2] for t in b])
        assert p > 1e-3, f"params {kind}, pairs: p = {p:.2e}"


def test_two_sample_test_rejects_a_different_distribution(small_vocab):
    """The test above can fail: temperature 1.0 against 0.8 is detected at the same sample size."""
    params = [SamplingParams(max_tokens=1, ignore_eos=True, temperature=t) for t in (1.0, 0.8)] * N_SAMPLES
    got = _samples(small_vocab, params, 3)
    assert _chi2_two_sample([t[0] for t in got[0::2]], [t[0] for t in got[1::2]]) < 1e-3


# -- seeds, mixed batches, preemption, n > 1 -------------------------------------------------------
@OVERLAP
def test_seeded_requests_are_reproducible_across_batches_and_preemption(target, draft, overlap):
    cfg = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3, **EVERY_STEP}
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True)
    noisy = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    others = [{"prompt_token_ids": list(range(20, 20 + n))} for n in (3, 17, 9)]
    llm = LLM(target, device="cpu", block_size=4, speculative_config=cfg, async_scheduling=overlap)
    alone = _tokens(llm, PROMPTS[1], seeded)[0]
    mixed = _tokens(llm, [others[0], PROMPTS[1], others[1]], [noisy, seeded, noisy])[1]
    small = LLM(target, device="cpu", block_size=4, num_kv_blocks=16, speculative_config=cfg,
                async_scheduling=overlap)
    tight = _tokens(small, others + [PROMPTS[1]], [noisy] * 3 + [seeded])[3]
    assert small.llm_engine.get_stats().num_preemptions > 0
    assert alone == mixed == tight
    _assert_nothing_held(small)


@OVERLAP
def test_seeded_sampling_emits_the_tokens_of_the_engine_without_speculation(target, base, overlap):
    """Verification draws each position's token as the plain sampler does (with the seed's noise for
    that output position) and accepts a proposal when they agree: a seeded request emits exactly what
    it emits without speculation, however many proposals were accepted (a draft identical to the
    target proposes its argmax, accepted where the draw agrees), with preemptions too."""
    cfg = {"method": "draft_model", "model": target, "num_speculative_tokens": 3, **EVERY_STEP}
    prompts = [PROMPTS[1], PROMPTS[0], {"prompt_token_ids": list(range(40, 58))}]
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=24, ignore_eos=True, n=1 + (s == 1),
                             repetition_penalty=1.2 if s == 2 else 1.0) for s in range(3)]
    want = _completions(base, prompts, params)
    llm = LLM(target, device="cpu", block_size=4, num_kv_blocks=20, speculative_config=cfg,
              async_scheduling=overlap)
    assert _completions(llm, prompts, params) == want
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and stats.spec_num_accepted_tokens >= 10
    _assert_nothing_held(llm)


@OVERLAP
def test_mixed_batch_of_speculating_greedy_sampled_and_prefilling_requests(target, base, overlap):
    """Greedy requests next to sampled ones, long prompts chunked beside verifications."""
    llm = LLM(target, device="cpu", block_size=4, max_num_batched_tokens=16, speculative_config=NGRAM,
              async_scheduling=overlap)
    long_prompt = {"prompt_token_ids": [(7 * i) % 300 + 3 for i in range(60)]}
    prompts = PROMPTS + [long_prompt, PROMPTS[0]]
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=5, seed=3, max_tokens=20, ignore_eos=True)]
    got = _tokens(llm, prompts, params)
    ref = _tokens(base, prompts, params)
    assert got[0] == ref[0] and got[2] == ref[2]
    assert len(got[1]) == len(got[3]) == 20
    assert llm.llm_engine.get_stats().spec_num_draft_tokens > 0
    _assert_nothing_held(llm)


@OVERLAP
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_preemption_mid_speculation_keeps_greedy_outputs(target, draft, base, method, overlap):
    cfg = NGRAM if method == "ngram" else {"method": "draft_model", "model": draft, "num_speculative_tokens": 3,
                                           **EVERY_STEP}
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10] * 2 + [i]} for i in range(3, 8)]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    small = LLM(target, device="cpu", block_size=4, num_kv_blocks=24, speculative_config=cfg,
                async_scheduling=overlap)
    got = _tokens(small, prompts, sp)
    assert small.llm_engine.get_stats().num_preemptions > 0
    assert got == _tokens(base, prompts, sp)
    _assert_nothing_held(small)


@OVERLAP
def test_n_greedy_children_with_a_draft_model(target, base, overlap):
    """n > 1 forks the prompt's blocks copy-on-write: the drafter's cache is copied with the target's
    (a draft identical to the target then still has every proposal accepted)."""
    llm = LLM(target, device="cpu", block_size=4, async_scheduling=overlap,
              speculative_config={"method": "draft_model", "model": target, "num_speculative_tokens": 3, **EVERY_STEP})
    for prompt in PROMPTS:
        single = _tokens(base, prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
        outs = llm.generate(prompt, SamplingParams(n=3, temperature=0, max_tokens=16, ignore_eos=True),
                            use_tqdm=False)[0].outputs
        assert [list(o.token_ids) for o in outs] == [single] * 3
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_accepted_tokens == stats.spec_num_draft_tokens > 0
    _assert_nothing_held(llm)


@OVERLAP
def test_n_logprobs_and_stop_strings(target, base, overlap):
    llm = LLM(target, device="cpu", block_size=4, speculative_config=NGRAM, async_scheduling=overlap)
    # n > 1 greedy: every child equals the single greedy completion.
    single = _tokens(base, PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    outs = llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=0, max_tokens=16, ignore_eos=True),
                        use_tqdm=False)[0].outputs
    assert [list(o.token_ids) for o in outs] == [single] * 3
    # Logprobs of accepted tokens: one entry per token, the chosen token's equal to no speculation.
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)
    a = llm.generate(PROMPTS[0], sp, use_tqdm=False)[0].outputs[0]
    b = base.generate(PROMPTS[0], sp, use_tqdm=False)[0].outputs[0]
    assert len(a.logprobs) == len(a.token_ids) == 16
    for la, lb, t in zip(a.logprobs, b.logprobs, b.token_ids):
        assert abs(la[t] - lb[t]) < 1e-4
    # A stop string inside a step's accepted tokens ends the text there.
    text = base.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].text
    stop = text[5:8]
    if stop:
        got = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=stop),
                           use_tqdm=False)[0].outputs[0]
        want = base.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=stop),
                             use_tqdm=False)[0].outputs[0]
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason)
    _assert_nothing_held(llm)


@OVERLAP
def test_migrated_request_resumes_mid_speculation(target, draft, overlap):
    """A core resumes a request from the tokens another core produced: the greedy stream goes on
    exactly as the undisturbed one."""
    cfg = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3, **EVERY_STEP}
    core = EngineCore.from_kwargs(target, device="cpu", block_size=4, speculative_config=cfg,
                                  async_scheduling=overlap)
    prompt = PROMPTS[0]["prompt_token_ids"]
    sp = lambda: SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)  # noqa: E731
    whole = _run_core(core, [CoreRequest("a", prompt, sp())])["a"]
    resumed = _run_core(core, [CoreRequest("b", prompt, sp(), output_token_ids=whole[:9])])["b"]
    assert whole[:9] + resumed == whole
    core.shutdown()


def _run_core(core: EngineCore, requests: list[CoreRequest]) -> dict[str, list[int]]:
    core.add(requests)
    got: dict[str, list[int]] = {r.request_id: [] for r in requests}
    while core.has_unfinished_requests():
        for out in core.step().outputs:
            assert out.error is None, out.error
            got[out.request_id] += out.new_token_ids
    return got


# -- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, field", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0}, "prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "/x"}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "eagle", "num_speculative_tokens": 2, "model": "/no/such/folder"}, "model"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "prompt_lookup_min": 2, "model": "/x"},
     "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "typo_field": 1}, "typo_field"),
])
def test_bad_config_is_a_value_error_naming_the_field(target, cfg, field):
    with pytest.raises(ValueError, match=field):
        LLM(target, device="cpu", speculative_config=cfg)


def test_draft_of_another_vocabulary_is_refused(target, tmp_path):
    other = make_tiny_llama(tmp_path / "other", vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size"):
        LLM(target, device="cpu", speculative_config={"method": "draft_model", "model": other,
                                                      "num_speculative_tokens": 2})


def test_draft_whose_heads_do_not_split_over_the_tp_ranks_is_refused(target, tmp_path):
    """At tensor_parallel_size > 1 the draft runs sharded with the target (tests/cluster/
    test_ray_executor.py), so its heads must split over the ranks; refused with the config."""
    from pagedray.cluster.config import build_engine_config
    odd = make_tiny_llama(tmp_path / "odd", hidden_size=48, num_attention_heads=3, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_attention_heads=3.*tensor_parallel_size=2"):
        build_engine_config(target, device="cpu", executor="ray", tensor_parallel_size=2,
                            speculative_config={"method": "draft_model", "model": odd,
                                                "num_speculative_tokens": 2})

def test_serve_parses_speculative_config_json():
    from pagedray.cluster.cli import build_parser
    args = build_parser().parse_args(["serve", "--speculative-config", json.dumps(NGRAM)])
    assert args.speculative_config == NGRAM


# -- the drafter's cache ---------------------------------------------------------------------------
@OVERLAP
@pytest.mark.parametrize("method", ["draft_model", "eagle", "eagle3"])
def test_drafter_cache_holds_every_verified_token(target, draft, heads, method, overlap):
    """Whatever was proposed and rejected, the drafter's last write at each position is the real
    token there (a draft model's input at p is token p; an EAGLE head's is token p + 1), through a
    chunked prefill: its K/V below a request's computed tokens is never stale."""
    llm = LLM(target, device="cpu", block_size=4, max_num_batched_tokens=8, enable_prefix_caching=False,
              speculative_config=_spec_configs(target, draft, heads)[method], async_scheduling=overlap)
    drafter = llm.llm_engine.executor.worker.runner.spec.drafter
    writes: dict[int, int] = {}
    forward = drafter.forward

    def logged(input_ids, positions, meta, feature):
        writes.update(zip(positions.tolist(), input_ids.tolist()))
        return forward(input_ids, positions, meta, feature)
    drafter.forward = logged
    prompt = PROMPTS[1]["prompt_token_ids"] * 3
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    tokens = prompt + list(out.token_ids)
    shift = 0 if method == "draft_model" else 1
    want = {p: tokens[p + shift] for p in range(len(tokens) - 1 - shift)}
    assert {p: writes.get(p) for p in want} == want


def test_prometheus_counters_take_vllm_names(target):
    """The engine's spec-decode counters reach /metrics as vllm:spec_decode_* under our prefix; stats of
    several cores add up, per position too."""
    from prometheus_client import generate_latest

    from pagedray.cluster.core.messages import sum_stats
    from pagedray.cluster.serving.metrics import ServingMetrics
    llm = LLM(target, device="cpu", block_size=4,
              speculative_config={"method": "draft_model", "model": target, "num_speculative_tokens": 3, **EVERY_STEP})
    _tokens(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    stats = sum_stats([llm.llm_engine.get_stats()] * 2)
    metrics = ServingMetrics()
    metrics.bind(lambda: stats)
    text = generate_latest(metrics.registry).decode()
    n = stats.spec_num_draft_tokens
    assert n > 0 and stats.spec_num_accepted_tokens == n    # the draft is the target
    assert f"pagedray_spec_decode_num_draft_tokens_total {float(n)}" in text
    assert f"pagedray_spec_decode_num_accepted_tokens_total {float(n)}" in text
    assert f"pagedray_spec_decode_num_drafts_total {float(stats.spec_num_drafts)}" in text
    per_pos = stats.spec_num_accepted_tokens_per_pos
    assert f'pagedray_spec_decode_num_accepted_tokens_per_pos_total{{position="0"}} {float(per_pos[0])}' in text


@OVERLAP
def test_prompt_logprobs_through_chunked_prefill_with_a_drafter(target, base, overlap):
    """Prompt logprobs come from the prefill chunks of a speculating engine as without speculation."""
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=2)
    prompt = {"prompt_token_ids": list(range(30, 60))}
    llm = LLM(target, device="cpu", block_size=4, max_num_batched_tokens=8, async_scheduling=overlap,
              speculative_config={"method": "draft_model", "model": target, "num_speculative_tokens": 3, **EVERY_STEP})
    a = llm.generate(prompt, sp, use_tqdm=False)[0]
    b = base.generate(prompt, sp, use_tqdm=False)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.prompt_logprobs[0] is None and len(a.prompt_logprobs) == len(b.prompt_logprobs) == 30
    for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
        assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-5 for t in x)


# -- structured outputs ----------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{0,7}$"},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@OVERLAP
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_structured_outputs_greedy_equal_the_engine_without_speculation(target, draft, base, method, overlap):
    """The verifier masks each verified position by the grammar after the proposals before it: greedy
    constrained outputs (JSON schema, regex, choice, logit_bias) equal the engine's without speculation,
    and a sampled one still parses."""
    from pagedray.common.sampling_params import StructuredOutputsParams as SO
    cfg = NGRAM if method == "ngram" else {"method": "draft_model", "model": draft, "num_speculative_tokens": 3,
                                           **EVERY_STEP}
    llm = LLM(target, device="cpu", block_size=4, speculative_config=cfg, async_scheduling=overlap)
    greedy = dict(temperature=0, max_tokens=48)
    params = [SamplingParams(structured_outputs=SO(json=SCHEMA), **greedy),
              SamplingParams(structured_outputs=SO(regex=r"(ab )+cd"), **greedy),
              SamplingParams(structured_outputs=SO(choice=["Paris", "Rome", "naïve café"]), **greedy),
              SamplingParams(logit_bias={40: 8.0, 41: 6.0}, ignore_eos=True, **greedy)]
    prompts = ["The capital of France is", "Hello, my name is", "Once upon a time", "def forward("]
    got = llm.generate(prompts, params, use_tqdm=False)
    want = base.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    json.loads(got[0].outputs[0].text)
    assert got[2].outputs[0].text in ("Paris", "Rome", "naïve café")
    sampled = llm.generate(prompts[0], SamplingParams(structured_outputs=SO(json=SCHEMA), temperature=1.0,
                                                      seed=4, max_tokens=100), use_tqdm=False)[0].outputs[0]
    assert sampled.finish_reason == "stop"
    json.loads(sampled.text)
    stats = llm.llm_engine.get_stats()
    # n-gram proposals repeat the constrained text and are accepted through the masks; the draft
    # proposes without the grammar (masking it would cost a host round trip per proposal).
    assert stats.spec_num_draft_tokens > 0 and (stats.spec_num_accepted_tokens > 0 or method != "ngram")
    _assert_nothing_held(llm)


def test_n_children_start_when_the_first_was_preempted_with_its_token_in_flight(target, draft, base):
    """n > 1 forks completions 1.. from completion 0 when its first token arrives; with overlapped
    steps completion 0 may have been preempted meanwhile (its blocks freed): the others then start
    as ordinary requests, and every completion equals the engine's without speculation."""
    cfg = {"method": "draft_model", "model": draft, "num_speculative_tokens": 3, **EVERY_STEP}
    core = EngineCore.from_kwargs(target, device="cpu", block_size=4, speculative_config=cfg, async_scheduling=True)
    params = lambda: SamplingParams(n=3, temperature=0.8, seed=5, max_tokens=12, ignore_eos=True)  # noqa: E731
    prompt = PROMPTS[1]["prompt_token_ids"]
    core.add([CoreRequest("a", prompt, params())])
    assert core.step().outputs == []          # the prefill is in flight, not read
    sched = core.scheduler
    first = sched.running[-1]
    sched.running.remove(first)
    sched._preempt(first)                     # as when a later step's blocks do not fit
    got: dict[int, list[int]] = {}
    while core.has_unfinished_requests():
        for out in core.step().outputs:
            assert out.error is None, out.error
            got.setdefault(out.index, []).extend(out.new_token_ids)
    want = base.generate({"prompt_token_ids": prompt}, params(), use_tqdm=False)[0].outputs
    assert [got[i] for i in range(3)] == [list(c.token_ids) for c in want]
    assert sched.block_manager.num_used_blocks == 0
    core.shutdown()
