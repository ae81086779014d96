"""Back-off of speculation whose proposals keep failing (cluster/core/spec_backoff.py), end to end on
a tiny random Llama (CPU), with serial and overlapped steps: the steps that verify follow the
back-off's schedule, an accepted probe brings every-step speculation back, outputs (greedy and
seeded) equal the engine without speculation, a drafter drafts nothing for a paused request, the
counters reach Prometheus, and bad config values are refused."""
from __future__ import annotations

from collections import defaultdict

import pytest
from testkit.hf_compare import assert_greedy_match, engine_greedy
from testkit.tiny_models import make_tiny_llama

from pagedray.cluster import LLM, SamplingParams
from pagedray.common.speculative import SpeculativeConfig

K, AFTER, MOST = 3, 2, 8
NGRAM = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "backoff_after_failed_steps": AFTER, "backoff_max_steps": MOST}
PROMPTS = [[31, 77, 12, 250, 3, 99, 140, 18, 61], [5, 6, 7, 8, 9, 10, 5, 6], [200, 14, 14, 90, 7]]
OVERLAP = pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("target"), num_hidden_layers=2)


@pytest.fixture(scope="module")
def base(target):
    return LLM(target, device="cpu", block_size=4)


@pytest.fixture(scope="module")
def reference(target, base):
    """Each prompt's greedy output without speculation."""
    outs = base.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return {tuple(p): list(o.outputs[0].token_ids) for p, o in zip(PROMPTS, outs)}


def _patch_lookup(llm: LLM, propose) -> None:
    """Replace the n-gram lookup's proposals by `propose(prompt, num_outputs)`: on the driver for
    serial steps, on the worker for overlapped ones (the lookup runs there)."""
    worker_spec = llm.llm_engine.executor.worker.runner.spec
    if worker_spec.overlapped:
        from pagedray.workers.spec_decode.runner import Drafts

        def lookup(runner, groups):
            states = [runner.requests[rid] for rid, _, _ in groups]
            lists = [propose(tuple(s.token_ids[:s.num_prompt_tokens]), len(s.token_ids) - s.num_prompt_tokens)
                     for s in states]
            return Drafts([rid for rid, _, _ in groups], lists=lists)
        worker_spec._ngram = lookup
    else:
        llm.llm_engine.scheduler.spec.lookup = \
            lambda request: propose(tuple(request.prompt_token_ids), request.num_output_tokens)


def _record_steps(llm: LLM) -> dict[str, list[tuple[int, int]]]:
    """Per request, each decode step's (proposals verified, proposals accepted), in step order."""
    sched = llm.llm_engine.scheduler
    update = sched.update_from_output
    steps: dict[str, list[tuple[int, int]]] = defaultdict(list)

    def recording(so, ro):
        for rid, n in so.num_scheduled_tokens.items():
            drafts = so.scheduled_spec_decode_tokens.get(rid, [])
            if rid in ro.sampled_token_ids and n == len(drafts) + 1:
                accepted = ro.accepted_token_ids.get(rid) or [None]
                steps[rid].append((len(drafts), len(accepted) - 1))
        return update(so, ro)
    sched.update_from_output = recording
    return steps


def _wrong(reference):
    """Proposals the target never accepts: its own next tokens, each plus one."""
    return lambda prompt, n: [(t + 1) % 256 for t in reference[prompt][n:n + K]]


def _verifying_steps(steps: list[tuple[int, int]]) -> list[int]:
    return [i for i, (drafts, _) in enumerate(steps) if drafts]


@OVERLAP
def test_failing_proposals_back_off_at_doubling_intervals(target, base, reference, overlap):
    """After AFTER failed verifications a request stops proposing for AFTER steps, then probes; each
    failed probe doubles the pause up to MOST. Overlapped, the driver learns a step's outcome one
    step late: one more verification starts the first pause, and each pause is a step longer (the
    step scheduled while the probe is in flight proposes nothing, rather than probing again)."""
    llm = LLM(target, device="cpu", block_size=4, speculative_config=NGRAM, async_scheduling=overlap)
    _patch_lookup(llm, _wrong(reference))
    steps = _record_steps(llm)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    plain = base.generate(prompts, GREEDY, use_tqdm=False)
    for o, p in zip(outs, plain):
        assert_greedy_match(engine_greedy(o.outputs[0]), engine_greedy(p.outputs[0]), what="backed off")
    lag = 1 if overlap else 0
    first = list(range(AFTER + lag))
    gaps = [p + 1 + lag for p in (AFTER, 2 * AFTER, MOST, MOST)]    # 3, 5, 9, 9 steps serial
    want = first + [first[-1] + sum(gaps[:i + 1]) for i in range(len(gaps))]
    for o in outs:
        got = steps[o.request_id]
        assert all(accepted == 0 for _, accepted in got)
        assert _verifying_steps(got)[:len(want)] == [w for w in want if w < len(got)], got
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_accepted_tokens == 0
    # Every plain decode step after the first pause began is a backed-off one (each request's first
    # decode step comes after its prefill step, which samples but is not counted here).
    plain_steps = sum(len(s) - len(_verifying_steps(s)) for s in steps.values())
    probe_waits = sum(len(_verifying_steps(s)) - len(first) for s in steps.values()) if overlap else 0
    assert stats.spec_num_backed_off_steps == plain_steps - probe_waits


@OVERLAP
def test_an_accepted_probe_resumes_speculation_every_step(target, base, reference, overlap):
    """Wrong proposals for the first 12 outputs, the target's own tokens after: once a probe is
    accepted every step verifies again (overlapped: but the one scheduled while the probe was in
    flight), and nothing is left of the back-off."""
    llm = LLM(target, device="cpu", block_size=4, speculative_config=NGRAM, async_scheduling=overlap)
    wrong = _wrong(reference)
    _patch_lookup(llm, lambda prompt, n: wrong(prompt, n) if n < 12 else reference[prompt][n:n + K])
    steps = _record_steps(llm)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for o, p in zip(outs, base.generate(prompts, GREEDY, use_tqdm=False)):
        assert_greedy_match(engine_greedy(o.outputs[0]), engine_greedy(p.outputs[0]), what="resumed")
    for o in outs:
        got = steps[o.request_id]
        assert any(d and not a for d, a in got[:6]), "the proposals failed at first"
        resumed = next(i for i, (d, a) in enumerate(got) if a)
        assert any(not d for d, _ in got[:resumed]), "a pause came before the accepted probe"
        after = got[resumed + 1 + (1 if overlap else 0):-1]   # (the last step: max_tokens leaves no room)
        assert after and all(d for d, _ in after), got
    assert not llm.llm_engine.scheduler.spec.backoff.state


@OVERLAP
def test_seeded_sampling_across_back_off_transitions_equals_no_speculation(target, base, reference, overlap):
    """Seeded sampled requests (some with penalties) whose proposals mostly fail, so they enter and
    leave pauses mid-generation: every token equals the engine's without speculation (each step
    draws as the plain sampler does, whether it verifies or not), and greedy logprobs are its too."""
    llm = LLM(target, device="cpu", block_size=4, speculative_config=NGRAM, async_scheduling=overlap)
    _patch_lookup(llm, _wrong(reference))
    params = [SamplingParams(temperature=t, top_p=p, seed=s, max_tokens=36, ignore_eos=True,
                             repetition_penalty=r, logprobs=1)
              for t, p, s, r in ((0.8, 1.0, 1, 1.0), (1.0, 0.9, 2, 1.2), (1.3, 1.0, 3, 1.0))]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    ours = llm.generate(prompts, params, use_tqdm=False)
    plain = base.generate(prompts, params, use_tqdm=False)
    for o, p in zip(ours, plain):
        assert list(o.outputs[0].token_ids) == list(p.outputs[0].token_ids)
        for a, b in zip(o.outputs[0].logprobs, p.outputs[0].logprobs):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
    assert llm.llm_engine.get_stats().spec_num_backed_off_steps > 0


@OVERLAP
def test_a_drafter_drafts_nothing_for_a_paused_request(target, tmp_path, base, overlap):
    """A random 1-layer draft (its proposals fail on the random target): once a request's pause has
    2+ steps left the driver lists it in the step and the drafter only catches up on its tokens
    (which keeps its cache valid for the probe); the outputs equal the engine without speculation,
    and the back-off counter reaches Prometheus."""
    from prometheus_client import generate_latest

    from pagedray.cluster.serving.metrics import ServingMetrics
    draft = make_tiny_llama(tmp_path / "draft", seed=7, num_hidden_layers=1)
    cfg = {"method": "draft_model", "model": draft, "num_speculative_tokens": K,
           "backoff_after_failed_steps": AFTER, "backoff_max_steps": MOST}
    llm = LLM(target, device="cpu", block_size=4, speculative_config=cfg, async_scheduling=overlap)
    drafter = llm.llm_engine.executor.worker.runner.spec.drafter
    propose, calls = drafter.propose, []

    def recording(runner, inputs, hidden, accepted, skip=frozenset()):
        out = propose(runner, inputs, hidden, accepted, skip)
        calls.append((set(accepted), set(skip), set(out[0]) if out is not None else set()))
        return out
    drafter.propose = recording
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for o, p in zip(outs, base.generate(prompts, GREEDY, use_tqdm=False)):
        assert_greedy_match(engine_greedy(o.outputs[0]), engine_greedy(p.outputs[0]), what="draft, backed off")
    assert any(skip for _, skip, _ in calls)
    for sampling, skip, drafted in calls:
        assert drafted == sampling - skip
    stats = llm.llm_engine.get_stats()
    assert stats.spec_num_backed_off_steps > 0 and stats.spec_num_drafts < 3 * 39 / 2
    metrics = ServingMetrics()
    metrics.bind(lambda: stats)
    text = generate_latest(metrics.registry).decode()
    assert f"pagedray_spec_decode_num_backed_off_steps_total {float(stats.spec_num_backed_off_steps)}" in text


@OVERLAP
def test_preemption_stop_strings_and_n_under_back_off(target, base, overlap):
    """Requests preempted while backed off (or mid-probe), n > 1 and stop strings: greedy outputs and
    texts equal the engine's without speculation, and no block is held after."""
    llm = LLM(target, device="cpu", block_size=4, num_kv_blocks=24, speculative_config=NGRAM,
              async_scheduling=overlap)
    _patch_lookup(llm, lambda prompt, n: [1] * K)   # (mostly wrong)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9, 10] * 2 + [i]} for i in range(3, 8)]
    sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert got == [list(o.outputs[0].token_ids) for o in base.generate(prompts, sp, use_tqdm=False)]
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0 and stats.spec_num_backed_off_steps > 0
    n2 = SamplingParams(n=2, temperature=0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts[0], n2, use_tqdm=False)[0].outputs
    assert [list(o.token_ids) for o in outs] == [got[0][:24]] * 2
    text = base.generate(prompts[1], sp, use_tqdm=False)[0].outputs[0].text
    stop = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=text[-12:-9])
    a, b = (e.generate(prompts[1], stop, use_tqdm=False)[0].outputs[0] for e in (llm, base))
    assert (a.text, a.finish_reason) == (b.text, "stop")
    assert not llm.llm_engine.scheduler.spec.backoff.state
    assert llm.llm_engine.get_stats().num_used_blocks == 0


def test_paused_overlapped_steps_start_before_the_last_is_read(target, base, reference):
    """Overlapped, greedy without logprobs (argmax only): a paused step after a paused step is queued
    before the last one is read, its input tokens gathered on the device from that step's argmax;
    the tokens equal those read at every step (with logprobs: nothing is deferred) and the engine's
    without speculation."""
    llm = LLM(target, device="cpu", block_size=4, speculative_config=NGRAM, async_scheduling=True)
    _patch_lookup(llm, _wrong(reference))
    spec = llm.llm_engine.executor.worker.runner.spec
    can_defer, deferred = spec._can_defer, []
    spec._can_defer = lambda pending, sched: deferred.append(can_defer(pending, sched)) or deferred[-1]
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    read_each_step = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert not any(deferred)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    ours = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert sum(deferred) >= 20
    assert ours == read_each_step == [reference[tuple(p)] for p in PROMPTS]


def test_off_verifies_every_step(target, reference):
    """backoff_after_failed_steps=0: every decode step verifies, however often it fails."""
    llm = LLM(target, device="cpu", block_size=4, speculative_config=dict(NGRAM, backoff_after_failed_steps=0))
    _patch_lookup(llm, _wrong(reference))
    steps = _record_steps(llm)
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                 use_tqdm=False)
    (got,) = steps.values()
    assert len(got) == 19 and all(d for d, _ in got[:-1])
    assert llm.llm_engine.get_stats().spec_num_backed_off_steps == 0


@pytest.mark.parametrize("field,value", [("backoff_after_failed_steps", -1), ("backoff_after_failed_steps", 1025),
                                         ("backoff_after_failed_steps", 2.0), ("backoff_max_steps", 0),
                                         ("backoff_max_steps", True), ("backoff_max_steps", 5000)])
def test_bad_backoff_values_are_a_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"speculative_config.{field} must be an integer in"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2, field: value})
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2})
    assert (cfg.backoff_after_failed_steps, cfg.backoff_max_steps) == (4, 64)   # on by default
