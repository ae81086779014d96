"""Prefill pacing (cluster/core/step_pacing.py): the fits, the cap, and the scheduler under it.

The scheduler runs against the fake worker of testkit/scheduler_fakes.py (outputs checked against
the reference generation) on a simulated clock: each step's time comes from a fake cost model with
the GPU's shape (a decode-only step is a cheap graph replay; a step with any prefill pays a large
fixed cost plus a per-token one), carried up in ModelRunnerOutput.step_time_s as the runner does.
"""
import random
from collections import defaultdict

import pytest

from pagedray.cluster.config import SchedulerConfig
from pagedray.cluster.core.request import Request
from pagedray.cluster.core.scheduler import Scheduler
from pagedray.cluster.core.step_pacing import OnlineLinearFit, PrefillPacer, StepShape, StepTimeModel
from pagedray.common.sampling_params import SamplingParams

from testkit.scheduler_fakes import BS, VOCAB, FakeWorker, reference

DECODE_S, PER_ROW_S = 0.007, 0.00002          # decode-only step: 7 ms + 20 us a row
MIXED_S, PER_PREFILL_S = 0.025, 0.00001       # any prefill: 25 ms floor (eager launches) + 10 us a token


def fake_step_time(so) -> float:
    prefill = sum(n for n in so.num_scheduled_tokens.values() if n > 1)
    rows = len(so.num_scheduled_tokens)
    return (MIXED_S + PER_PREFILL_S * prefill if prefill else DECODE_S) + PER_ROW_S * rows


# -- the fits ------------------------------------------------------------------------
def test_linear_fit_recovers_coefficients_and_survives_a_constant_feature():
    fit = OnlineLinearFit(3, decay=0.99)
    rng = random.Random(0)
    for _ in range(200):
        x = (1.0, rng.uniform(0, 4), 1.0)        # third feature never varies: ridge keeps it solvable
        fit.add(x, 0.5 + 2.0 * x[1] + 0.1 * x[2])
    assert fit.predict((1.0, 3.0, 1.0)) == pytest.approx(0.5 + 6.0 + 0.1, rel=1e-3)
    assert abs(fit.coef[2]) < 1.0


def test_linear_fit_forgets_old_steps():
    fit = OnlineLinearFit(2, decay=0.9)
    for i in range(100):
        fit.add((1.0, i % 3), 1.0)
    for i in range(100):
        fit.add((1.0, i % 3), 3.0 + i % 3)        # the step costs changed (e.g. another kernel)
    assert fit.predict((1.0, 2.0)) == pytest.approx(5.0, rel=1e-3)


def test_model_max_prefill_tokens():
    model = StepTimeModel(decay=1.0)
    for i in range(20):
        model.observe(StepShape(8 + i, 0, 1000), DECODE_S)
        model.observe(StepShape(8, 64 * (1 + i % 4), 1000), 0.010 + 0.0001 * 64 * (1 + i % 4))
    assert model.ready
    assert model.mixed_step(8, 100, 1000) == pytest.approx(0.020, rel=1e-2)
    assert model.max_prefill_tokens(8, 1000, 0.020, 4096) == pytest.approx(100, abs=2)
    assert model.max_prefill_tokens(8, 1000, 0.005, 4096) == 0        # below the fixed cost
    assert model.max_prefill_tokens(8, 1000, 1.0, 512) == 512          # the token budget still binds


# -- config ----------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("tpot_target_ratio", 1.0, r"tpot_target_ratio must be a number in \(1, 100\].*got 1.0"),
    ("tpot_target_ratio", "1.3", r"tpot_target_ratio .* got '1.3'"),
    ("max_prefill_delay_ms", 0, r"max_prefill_delay_ms must be in \(0, 600000\] ms, got 0"),
    ("min_prefill_chunk_tokens", 0, r"min_prefill_chunk_tokens must be an integer >= 1, got 0"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**{field: value})


# -- the scheduler under pacing, on a simulated clock -------------------------------------
class Sim:
    def __init__(self, ratio: float | None, num_blocks: int = 400, max_num_seqs: int = 32, budget: int = 64,
                 caching: bool = False, max_delay_ms: float = 250.0, timed: bool = True) -> None:
        cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=128,
                              tpot_target_ratio=ratio, max_prefill_delay_ms=max_delay_ms,
                              min_prefill_chunk_tokens=8)
        self.sched = Scheduler(cfg, BS, num_blocks, caching)
        self.worker = FakeWorker(num_blocks)
        self.now = 0.0
        self.timed = timed
        if self.sched.pacer is not None:
            self.sched.pacer.clock = lambda: self.now
        self.token_times: dict[str, list[float]] = defaultdict(list)
        self.arrivals: dict[str, float] = {}
        self.outputs: dict[str, list[int]] = defaultdict(list)
        self.steps: list[dict[str, int]] = []

    def run(self, requests: list[tuple[float, str, list[int], dict]], max_steps: int = 20000) -> None:
        pending = sorted(requests)
        for _ in range(max_steps):
            while pending and pending[0][0] <= self.now:
                t, rid, prompt, params = pending.pop(0)
                self.arrivals[rid] = t
                self.sched.add_request(Request(rid, prompt, SamplingParams(**params), arrival_time=t))
            if not pending and not self.sched.has_unfinished_requests():
                break
            so = self.sched.schedule()
            if so.is_empty:
                self.now = pending[0][0]
                continue
            self.steps.append(dict(so.num_scheduled_tokens))
            out = self.worker.execute(so)
            self.now += fake_step_time(so)
            out.step_time_s = fake_step_time(so) if self.timed else None
            for req, toks in self.sched.update_from_output(so, out):
                self.outputs[req.request_id] += toks
                self.token_times[req.request_id] += [self.now] * len(toks)
        assert not pending and not self.sched.has_unfinished_requests(), "no progress"
        bm = self.sched.block_manager
        assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"

    def tpots(self) -> list[float]:
        return [(t[-1] - t[0]) / (len(t) - 1) for t in self.token_times.values() if len(t) > 1]

    def ttfts(self) -> list[float]:
        return [self.token_times[rid][0] - t for rid, t in self.arrivals.items()]


def poisson_workload(n: int = 60, rate: float = 20.0, seed: int = 0, output_len: int = 40):
    rng = random.Random(seed)
    t, reqs = 0.0, []
    for i in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(12 + rng.randrange(24))]
        reqs.append((t, f"r{i}", prompt, dict(max_tokens=output_len, ignore_eos=True)))
        t += rng.expovariate(rate)
    return reqs


def check_outputs(sim: Sim, reqs) -> None:
    for _, rid, prompt, params in reqs:
        assert sim.outputs[rid] == reference(rid, prompt, SamplingParams(**params), 128), rid


def median(xs):
    return sorted(xs)[len(xs) // 2]


def test_pacing_keeps_tpot_near_target_and_bounds_ttft():
    reqs = poisson_workload()
    off, on = Sim(None), Sim(1.3)
    off.run(reqs)
    on.run(reqs)
    check_outputs(off, reqs)
    check_outputs(on, reqs)
    pacer = on.sched.pacer
    assert pacer.num_held_steps > 0 and pacer.model.ready
    # Off: every arrival gets its own 25 ms mixed step (TPOT ~10 ms); on: decode-only steps take
    # ~7.2-7.6 ms here and the running streams stay near 1.3x that.
    assert median(on.tpots()) < 0.92 * median(off.tpots())
    assert median(on.tpots()) < 1.3 * (DECODE_S + 16 * PER_ROW_S)
    # Arrivals wait for credit, never past the delay bound (+ the step in flight and the prefill step).
    assert max(on.ttfts()) < 0.250 + 2 * (MIXED_S + 0.003)
    assert median(on.ttfts()) > median(off.ttfts())     # the price: arrivals are batched


def test_without_step_times_pacing_changes_nothing():
    reqs = poisson_workload(n=20)
    off, on = Sim(None), Sim(1.3, timed=False)
    off.run(reqs)
    on.run(reqs)
    assert on.steps == off.steps and on.sched.pacer.num_held_steps == 0


def test_unreachable_target_still_admits_every_prompt_within_the_delay():
    """A mixed step always costs more than target + credit here: prefill goes only by the delay bound."""
    reqs = poisson_workload(n=30, rate=50.0)
    on = Sim(1.01, max_delay_ms=100.0)
    on.run(reqs)
    check_outputs(on, reqs)
    assert on.sched.pacer.num_forced_steps > 0
    assert max(on.ttfts()) < 0.100 + 3 * (MIXED_S + 0.005)


@pytest.mark.parametrize("num_blocks,caching", [(24, False), (60, True)])
def test_pacing_with_preemption_and_prefix_caching_matches_reference(num_blocks, caching):
    shared = [3, 1, 4, 1, 5, 9, 2, 6]
    reqs = [(t, rid, (shared if i % 2 else []) + p, params)
            for i, (t, rid, p, params) in enumerate(poisson_workload(n=30, output_len=24))]
    on = Sim(1.3, num_blocks=num_blocks, max_num_seqs=8, budget=24, caching=caching)
    on.run(reqs)
    check_outputs(on, reqs)
    assert on.sched.pacer.num_held_steps > 0
    if num_blocks == 24:
        assert on.sched.num_preemptions > 0
    for step in on.steps:     # a chunked prefill is capped too, never past the token budget
        assert sum(step.values()) <= 24


def test_plan_counts_proposals_as_decode_tokens_and_skips_in_flight():
    pacer = PrefillPacer(1.3, 250.0, 8, clock=lambda: 0.0, speculative=True)
    running = []
    for i, spec in enumerate(([], [5, 6, 7])):
        r = Request(f"d{i}", [1, 2, 3], SamplingParams(), arrival_time=0.0)
        r.num_computed_tokens = 2     # one token left: at its decode point
        r.spec_token_ids = spec
        running.append(r)
    prefilling = Request("p", list(range(3, 40)), SamplingParams(), arrival_time=0.0)
    prefilling.num_computed_tokens = 16
    plan = pacer.plan(running + [prefilling], [], 64)
    assert plan.shape.decode_tokens == 1 + 4 and plan.shape.context_tokens == 2 + 2 + 16
    assert plan.prefill_cap == 64                            # fits not ready yet: the whole budget
    plan = pacer.plan(running + [prefilling], [], 64, skip={"d1"})
    assert plan.shape.decode_tokens == 1


def _trained_pacer(credit_s: float) -> PrefillPacer:
    """Fits of a GPU-like cost: decode-only 7 ms; any prefill 20 ms + 10 us a token."""
    pacer = PrefillPacer(1.3, 250.0, 8, clock=lambda: 0.0, decay=1.0)
    for i in range(20):
        pacer.model.observe(StepShape(32 + i % 3, 0, 4096), 0.007)
        p = 128 * (1 + i % 8)
        pacer.model.observe(StepShape(32 + i % 3, p, 4096), 0.020 + 1e-5 * p)
    pacer.credit_s = credit_s
    return pacer


def _running(n: int) -> list[Request]:
    out = []
    for i in range(n):
        r = Request(f"d{i}", [1] * 128, SamplingParams(), arrival_time=0.0)
        r.num_computed_tokens = 127
        out.append(r)
    return out


def test_cap_takes_all_pending_once_it_fits_and_no_chunk_below_the_knee():
    waiting = [Request("w", [1] * 300, SamplingParams(), arrival_time=0.0)]
    # Target 1.3 x 7 ms = 9.1 ms; 300 tokens cost 23 ms: 13.9 ms of credit needed.
    assert _trained_pacer(0.015).plan(_running(32), waiting, 2048).prefill_cap == 2048
    # 12.5 ms of credit: a 21.6 ms step fits 160 prefill tokens, half the prompt; below the knee
    # (13 ms of fixed cost / 10 us a token = 1300 tokens) such a chunk is not worth a mixed step.
    held = _trained_pacer(0.0125)
    plan = held.plan(_running(32), waiting, 2048)
    assert plan.prefill_cap == 0 and plan.held and held.num_held_steps == 1


def test_a_scheduled_step_spends_its_credit_before_its_time_arrives():
    """Overlapped steps: a second step planned before the first one's time is read cannot spend the
    same credit again; the measured time then settles the charge."""
    pacer = _trained_pacer(0.015)
    waiting = [Request("w", [1] * 300, SamplingParams(), arrival_time=0.0)]
    first = pacer.plan(_running(32), waiting, 2048)
    assert first.prefill_cap == 2048
    pacer.scheduled(1, first, 32 + 300, max_unread=4)
    assert pacer.credit_s == pytest.approx(0.015 + 0.0091 - 0.023, abs=1e-4)
    assert pacer.plan(_running(32), waiting, 2048).prefill_cap == 0     # the next arrival waits
    pacer.observe(1, 0.030)       # slower than predicted: the difference is charged too
    assert pacer.credit_s == pytest.approx(0.015 + 0.0091 - 0.030, abs=1e-4)


def test_pacing_under_a_pipeline_of_two_steps_matches_reference():
    """Pipeline parallelism: two steps in flight, built with schedule(skip=...); the time of each
    arrives when it is read, after the next one was planned."""
    reqs = poisson_workload(n=30, output_len=24)
    sim = Sim(1.3, max_num_seqs=8, budget=24)
    sched, worker, pending, in_flight = sim.sched, sim.worker, sorted(reqs), []
    sched.max_unread_steps = 3
    for _ in range(20000):
        while pending and pending[0][0] <= sim.now:
            t, rid, prompt, params = pending.pop(0)
            sched.add_request(Request(rid, prompt, SamplingParams(**params), arrival_time=t))
        while len(in_flight) < 2:
            busy = {rid for so, _ in in_flight for rid in so.num_scheduled_tokens}
            so = sched.schedule(skip=busy)
            if so.is_empty:
                break
            out = worker.execute(so)
            out.step_time_s = fake_step_time(so)
            in_flight.append((so, out))
        if not in_flight:
            if not pending:
                break
            sim.now = pending[0][0]
            continue
        so, out = in_flight.pop(0)
        sim.now += out.step_time_s
        for req, toks in sched.update_from_output(so, out):
            sim.outputs[req.request_id] += toks
    assert not pending and not sched.has_unfinished_requests()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    check_outputs(sim, reqs)
    assert sched.pacer.model.ready and sched.pacer.num_held_steps > 0
