"""Scheduler: budgets, chunked prefill, preemption, FCFS, aborts, stops, prefix sharing, forks.

Driven by a fake worker that keeps per-request state from the SchedulerOutput messages exactly as
the ModelRunner does, stores each token id in a fake paged KV cache at its slot, and "samples" a
deterministic function of the context READ BACK THROUGH THE BLOCK TABLE. A wrong block table,
a prefix-cache hit on a stale block, a missed copy-on-write or a bad delta therefore changes the
outputs or trips an assertion, and every run is checked against a reference generation.
"""
import subprocess
import sys
from collections import defaultdict, deque

import pytest

from pagedray.cluster.config import SchedulerConfig
from pagedray.cluster.core.request import Request, RequestStatus
from pagedray.cluster.core.scheduler import Scheduler
from pagedray.common.messages import ModelRunnerOutput
from pagedray.common.sampling_params import SamplingParams

from testkit.scheduler_fakes import BS, VOCAB, FakeWorker, reference


def make_scheduler(num_blocks=64, max_num_seqs=8, budget=32, max_model_len=64, chunked=True, caching=False):
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          max_model_len=max_model_len, enable_chunked_prefill=chunked)
    return Scheduler(cfg, BS, num_blocks, caching), FakeWorker(num_blocks)


def add(sched: Scheduler, rid: str, prompt: list[int], **params) -> Request:
    req = Request(rid, prompt, SamplingParams(**params))
    sched.add_request(req)
    return req


def step(sched: Scheduler, worker: FakeWorker):
    so = sched.schedule()
    cfg = sched.config
    assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
    assert so.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(so.num_scheduled_tokens) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    return so, sched.update_from_output(so, worker.execute(so))


def drive(sched: Scheduler, worker: FakeWorker, max_steps: int = 2000) -> dict[str, list[int]]:
    outputs = defaultdict(list)
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        for req, toks in step(sched, worker)[1]:
            outputs[req.request_id] += toks
    assert not sched.has_unfinished_requests(), "the scheduler stopped making progress"
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    return dict(outputs)


# -- purity ----------------------------------------------------------------------
def test_scheduler_import_does_not_pull_torch():
    code = "import sys, pagedray.cluster.core.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- budgets ---------------------------------------------------------------------
def workload(n: int = 12) -> list[tuple[str, list[int], dict]]:
    shared = [3, 1, 4, 1, 5, 9, 2, 6]
    reqs = []
    for i in range(n):
        prompt = (shared if i % 3 == 0 else []) + [(7 * i + j) % VOCAB for j in range(3 + (5 * i) % 17)]
        reqs.append((f"r{i}", prompt, dict(max_tokens=4 + (3 * i) % 9, ignore_eos=True)))
    return reqs


@pytest.mark.parametrize("chunked,budget,max_model_len", [(True, 10, 64), (False, 32, 32)])
def test_budgets_respected_and_outputs_match_reference(chunked, budget, max_model_len):
    sched, worker = make_scheduler(max_num_seqs=3, budget=budget, max_model_len=max_model_len, chunked=chunked)
    reqs = workload()
    for rid, prompt, params in reqs:
        add(sched, rid, prompt, **params)
    outputs = drive(sched, worker)     # step() asserts budget and max_num_seqs every step
    for rid, prompt, params in reqs:
        assert outputs[rid] == reference(rid, prompt, SamplingParams(**params), sched.config.max_model_len)


def test_chunked_prefill_splits_long_prompt_and_mixes_decodes():
    sched, worker = make_scheduler(budget=8, chunked=True)
    add(sched, "short", [1, 2, 3], max_tokens=20, ignore_eos=True)
    so, _ = step(sched, worker)
    assert so.num_scheduled_tokens == {"short": 3}
    add(sched, "long", list(range(20)), max_tokens=2, ignore_eos=True)
    chunks = []
    for _ in range(3):
        so, out = step(sched, worker)
        assert so.num_scheduled_tokens["short"] == 1
        chunks.append(so.num_scheduled_tokens["long"])
        got = {r.request_id for r, _ in out}
        assert ("long" in got) == (sum(chunks) == 20)     # no token while mid-prefill
    assert chunks == [7, 7, 6]
    new = [r for r in so.scheduled_new_reqs if r.req_id == "long"]
    assert not new, "a request in chunked prefill travels as a delta after its first chunk"


def test_without_chunking_a_prompt_runs_whole_or_waits():
    sched, worker = make_scheduler(budget=16, max_model_len=16, chunked=False)
    add(sched, "a", [1, 2, 3], max_tokens=3, ignore_eos=True)
    step(sched, worker)
    add(sched, "b", list(range(16)), max_tokens=1, ignore_eos=True)
    so, _ = step(sched, worker)          # b needs all 16 tokens but only 15 are left after a's decode
    assert so.num_scheduled_tokens == {"a": 1}
    step(sched, worker)                  # a finishes (3 tokens)
    so, _ = step(sched, worker)
    assert so.num_scheduled_tokens == {"b": 16}


def test_strict_fcfs_head_blocks_the_queue():
    sched, worker = make_scheduler(num_blocks=4, budget=64)
    add(sched, "a", list(range(8)), max_tokens=3, ignore_eos=True)      # 2 blocks, then a 3rd
    step(sched, worker)
    add(sched, "big", list(range(12)), max_tokens=1, ignore_eos=True)   # 3 blocks: does not fit
    add(sched, "small", [1, 2], max_tokens=1, ignore_eos=True)          # would fit, must not overtake
    so, _ = step(sched, worker)
    assert set(so.num_scheduled_tokens) == {"a"}
    assert [r.request_id for r in sched.waiting] == ["big", "small"]
    outputs = drive(sched, worker)
    assert set(outputs) == {"a", "big", "small"}


def test_max_num_seqs_limits_admission():
    sched, worker = make_scheduler(max_num_seqs=2, budget=64)
    for i in range(3):
        add(sched, f"r{i}", [i + 1, 2, 3], max_tokens=2, ignore_eos=True)
    so, _ = step(sched, worker)
    assert set(so.num_scheduled_tokens) == {"r0", "r1"} and sched.num_waiting == 1


# -- preemption ------------------------------------------------------------------
def test_preempts_newest_first_requeues_at_front_and_resumes_with_all_tokens():
    sched, worker = make_scheduler(num_blocks=6, budget=64)
    a = add(sched, "a", list(range(7)), max_tokens=3, ignore_eos=True)
    add(sched, "b", list(range(10, 17)), max_tokens=6, ignore_eos=True)
    c = add(sched, "c", list(range(20, 27)), max_tokens=6, ignore_eos=True)
    step(sched, worker)                               # all three prefill: 2 blocks each, none free
    add(sched, "d", [40, 41, 42], max_tokens=1, ignore_eos=True)
    so, _ = step(sched, worker)                       # decodes fit their 2nd block; d cannot get one
    assert set(so.num_scheduled_tokens) == {"a", "b", "c"}
    so, _ = step(sched, worker)                       # a and b need a 3rd block: c (newest) goes
    assert so.num_scheduled_tokens == {"a": 1, "b": 1}
    assert "c" in so.finished_req_ids and sched.num_preemptions == 1
    assert [r.request_id for r in sched.waiting] == ["c", "d"]
    assert c.status is RequestStatus.WAITING and c.num_computed_tokens == 0 and c.num_output_tokens == 2
    assert a.is_finished                              # max_tokens=3 frees a's 3 blocks
    so, _ = step(sched, worker)
    new = {r.req_id: r for r in so.scheduled_new_reqs}
    assert set(new) == {"c"}
    assert new["c"].token_ids == c.prompt_token_ids + c.output_token_ids[:2]
    assert new["c"].num_prompt_tokens == 7 and new["c"].num_computed_tokens == 0
    assert so.num_scheduled_tokens["c"] == 9
    outputs = drive(sched, worker)
    assert c.output_token_ids == reference("c", c.prompt_token_ids, c.sampling_params, 64)
    assert "d" in outputs


def test_request_being_scheduled_preempts_itself_when_newest():
    sched, worker = make_scheduler(num_blocks=4, budget=64)
    add(sched, "a", list(range(6)), max_tokens=4, ignore_eos=True)    # writes pos 6, 7: no new block
    add(sched, "b", list(range(10, 18)), max_tokens=4, ignore_eos=True)  # writes pos 8: needs a block
    step(sched, worker)
    so, _ = step(sched, worker)
    assert so.num_scheduled_tokens == {"a": 1}
    assert "b" in so.finished_req_ids and [r.request_id for r in sched.waiting] == ["b"]


@pytest.mark.parametrize("caching,chunked,budget", [(False, True, 12), (True, True, 12), (True, False, 64),
                                                    (False, False, 64), (True, True, 5)])
def test_preempted_run_matches_plentiful_run(caching, chunked, budget):
    def run(num_blocks: int, **kw):
        sched, worker = make_scheduler(num_blocks=num_blocks, max_num_seqs=6, max_model_len=64, **kw)
        for rid, prompt, params in workload():
            add(sched, rid, prompt, **params)
        return drive(sched, worker), sched.num_preemptions, sched.block_manager.prefix_cache_hit_tokens
    baseline, none, _ = run(256, budget=64, caching=False, chunked=True)
    assert none == 0
    tight, preemptions, hits = run(12, budget=budget, caching=caching, chunked=chunked)
    assert preemptions > 0 and (hits > 0) == caching
    assert tight == baseline
    for rid, prompt, params in workload():
        assert baseline[rid] == reference(rid, prompt, SamplingParams(**params), 64)


# -- aborts ----------------------------------------------------------------------
@pytest.mark.parametrize("caching", [False, True])
def test_abort_mid_prefill_mid_decode_and_waiting_frees_everything(caching):
    sched, worker = make_scheduler(num_blocks=16, budget=6, caching=caching)
    add(sched, "dec", [1, 2, 3], max_tokens=50, ignore_eos=True)
    step(sched, worker)
    add(sched, "pre", list(range(20)), max_tokens=5, ignore_eos=True)
    step(sched, worker)                       # pre: first 5-token chunk of 20
    add(sched, "wait", list(range(30)), max_tokens=5, ignore_eos=True)
    assert sched.requests["pre"].num_computed_tokens == 5 and sched.block_manager.num_used_blocks > 0
    sched.abort_requests(["pre", "dec", "wait", "unknown"])
    for rid in ("pre", "dec"):
        assert worker.reqs.get(rid) is not None
    assert not sched.has_unfinished_requests()
    assert sched.block_manager.num_free_blocks == 16
    so = sched.schedule()
    assert so.finished_req_ids == {"pre", "dec"} and so.is_empty   # "wait" never reached the workers
    worker.execute(so)
    assert worker.reqs == {}


# -- stops -----------------------------------------------------------------------
def scripted(tokens: list[int]):
    """A worker whose samples follow a script, whatever the context."""
    return lambda rid, ctx: tokens[len(ctx) - 3]     # prompts in these tests have 3 tokens


@pytest.mark.parametrize("params,script,want,status", [
    (dict(eos_token_id=7), [1, 7, 2], [1, 7], "stop"),
    (dict(eos_token_id=7, min_tokens=3), [7, 1, 7, 7], [7, 1, 7], "stop"),
    (dict(eos_token_id=7, ignore_eos=True, max_tokens=3), [7, 7, 7, 7], [7, 7, 7], "length"),
    (dict(stop_token_ids=[5, 6]), [1, 2, 6, 3], [1, 2, 6], "stop"),
    (dict(stop_token_ids=[5], min_tokens=2), [5, 5, 1], [5, 5], "stop"),
    (dict(max_tokens=2), [1, 2, 3], [1, 2], "length"),
    (dict(eos_token_id=7, max_tokens=2), [1, 7, 3], [1, 7], "length"),  # length wins, as in vLLM
])
def test_token_level_stops(params, script, want, status):
    sched, _ = make_scheduler()
    worker = FakeWorker(64, sample_fn=scripted(script + [0] * 20))
    req = add(sched, "r", [9, 9, 9], **params)
    outputs = drive(sched, worker)
    assert outputs["r"] == want and req.output_token_ids == want
    assert req.status.finish_reason == status
    if params.get("stop_token_ids") and status == "stop":
        assert req.stop_reason == want[-1]


@pytest.mark.parametrize("params,script,want,stop_reason", [
    (dict(eos_token_id=7), [1, 7, 2], [1, 7], None),                                  # eos: no stop_reason
    (dict(eos_token_id=7, stop_token_ids=[7]), [1, 7, 2], [1, 7], None),              # eos first, as in vLLM
    (dict(eos_token_id=7, stop_token_ids=[7], ignore_eos=True), [1, 7, 2], [1, 7], 7),
    (dict(eos_token_id=7, stop_token_ids=[5]), [5, 7, 2], [5], 5),
])
def test_stop_reason_names_the_stop_token_not_eos(params, script, want, stop_reason):
    sched, _ = make_scheduler()
    worker = FakeWorker(64, sample_fn=scripted(script + [0] * 20))
    req = add(sched, "r", [9, 9, 9], **params)
    assert drive(sched, worker)["r"] == want
    assert req.status.finish_reason == "stop" and req.stop_reason == stop_reason


def test_max_model_len_stops_and_finish_requests():
    sched, worker = make_scheduler(max_model_len=10)
    req = add(sched, "r", list(range(8)), max_tokens=None)
    other = add(sched, "s", [1, 2, 3], max_tokens=None)
    step(sched, worker)
    sched.finish_requests(["s"], RequestStatus.FINISHED_STOPPED)      # the engine matched a stop string
    assert other.status.finish_reason == "stop"
    drive(sched, worker)
    assert req.num_output_tokens == 2 and req.status is RequestStatus.FINISHED_LENGTH
    with pytest.raises(ValueError, match="finished status"):
        sched.finish_requests(["r"], RequestStatus.RUNNING)


def test_add_request_validates():
    sched, _ = make_scheduler(num_blocks=4, max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len=32"):
        add(sched, "long", list(range(33)))
    with pytest.raises(ValueError, match="capacity of 16"):
        add(sched, "big", list(range(10)), max_tokens=10)
    add(sched, "ok", list(range(10)), max_tokens=7)
    with pytest.raises(ValueError, match="already scheduled"):
        add(sched, "ok", [1])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Request("x", [], SamplingParams())


# -- prefix sharing and forks ----------------------------------------------------
def test_identical_prompts_share_blocks_within_one_step():
    sched, worker = make_scheduler(caching=True)
    prompt = list(range(9))
    a = add(sched, "a", prompt, max_tokens=3, ignore_eos=True)
    b = add(sched, "b", prompt, max_tokens=3, ignore_eos=True)
    so, _ = step(sched, worker)
    new = {r.req_id: r for r in so.scheduled_new_reqs}
    assert new["b"].num_computed_tokens == 8 and so.num_scheduled_tokens == {"a": 9, "b": 1}
    assert new["b"].block_ids[:2] == new["a"].block_ids[:2]
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 8)
    drive(sched, worker)
    assert a.output_token_ids == b.output_token_ids == reference("a", prompt, a.sampling_params, 64)
    assert sched.block_manager.prefix_cache_hit_tokens == 8


def test_fork_copies_shared_block_for_the_child():
    sched, worker = make_scheduler(num_blocks=8)
    prompt = [5, 4, 3, 2, 1, 0]
    parent = add(sched, "p", prompt, max_tokens=4, ignore_eos=True)
    step(sched, worker)                               # prefill: blocks [0, 1], 1 output
    child = Request("p#1", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    child.num_computed_tokens = 5                     # recompute the last prompt token for its own logits
    sched.fork_request("p", child)
    so, _ = step(sched, worker)
    assert so.blocks_to_copy == [(1, 2)]
    assert [r.req_id for r in so.scheduled_new_reqs] == ["p#1"]
    assert so.scheduled_new_reqs[0].block_ids == [0, 2] and not so.finished_req_ids
    drive(sched, worker)
    assert parent.output_token_ids == reference("p", prompt, parent.sampling_params, 64)
    assert child.output_token_ids == reference("p#1", prompt, child.sampling_params, 64)
    assert child.output_token_ids != parent.output_token_ids


def test_fork_without_free_block_copies_lazily_and_resends_parent():
    sched, worker = make_scheduler(num_blocks=3)
    prompt = [5, 4, 3, 2, 1, 0]
    parent = add(sched, "p", prompt, max_tokens=2, ignore_eos=True)
    add(sched, "x", [1, 2, 3], max_tokens=5, ignore_eos=True)
    step(sched, worker)                               # p: blocks 0, 1; x: block 2; none free
    child = Request("p#1", prompt, SamplingParams(max_tokens=3, ignore_eos=True))
    child.num_computed_tokens = 5
    sched.fork_request("p", child)                   # no block for an eager copy
    sched.abort_requests(["x"])
    so, _ = step(sched, worker)                       # the parent writes the shared block first
    assert so.blocks_to_copy == [(1, 2)]
    assert {r.req_id for r in so.scheduled_new_reqs} == {"p", "p#1"} and "p" in so.finished_req_ids
    drive(sched, worker)
    assert parent.output_token_ids == reference("p", prompt, parent.sampling_params, 64)
    assert child.output_token_ids == reference("p#1", prompt, child.sampling_params, 64)


def test_fork_rejects_bad_children():
    sched, worker = make_scheduler()
    add(sched, "p", [1, 2, 3, 4], max_tokens=4, ignore_eos=True)
    step(sched, worker)
    bad = Request("p#1", [1, 2, 9, 4], SamplingParams())
    bad.num_computed_tokens = 3
    with pytest.raises(ValueError, match="num_computed_tokens=3"):
        sched.fork_request("p", bad)
    with pytest.raises(ValueError, match="not running"):
        sched.fork_request("nobody", Request("q", [1], SamplingParams()))


# -- overlapped steps (placeholders) ----------------------------------------------
def test_overlapped_steps_compute_the_token_in_flight_and_stop_at_max_tokens():
    """The engine schedules one step ahead of the outputs it read: a request's placeholders count
    as tokens to compute, and once the tokens in flight reach max_tokens it is not scheduled."""
    sched, _ = make_scheduler(budget=32)
    a = add(sched, "a", [1, 2, 3], max_tokens=3, ignore_eos=True)
    s1 = sched.schedule()                         # prefill: samples output 1
    assert a.num_computed_tokens == 3 and a.num_output_placeholders == 1
    s2 = sched.schedule()                         # output 1 still in flight: its K/V is computed now
    assert s2.num_scheduled_tokens == {"a": 1} and a.num_output_placeholders == 2
    assert sched.update_from_output(s1, ModelRunnerOutput({"a": 7})) == [(a, [7])]
    s3 = sched.schedule()
    assert s3.num_scheduled_tokens == {"a": 1} and a.num_computed_tokens == 5
    sched.update_from_output(s2, ModelRunnerOutput({"a": 8}))
    assert sched.schedule().is_empty              # 2 known + 1 in flight = max_tokens: nothing to run
    sched.update_from_output(s3, ModelRunnerOutput({"a": 9}))
    assert a.output_token_ids == [7, 8, 9] and a.status is RequestStatus.FINISHED_LENGTH
    assert a.num_output_placeholders == 0
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_preempted_with_a_token_in_flight_keeps_it_and_resumes_after_it_arrives():
    sched, _ = make_scheduler(num_blocks=2, budget=32)   # 8 slots: the two cannot both grow
    a = add(sched, "a", [1, 2, 3], max_tokens=5, ignore_eos=True)
    b = add(sched, "b", [4, 5, 6], max_tokens=5, ignore_eos=True)
    s1 = sched.schedule()                         # both prefill into one block each
    s2 = sched.schedule()                         # both decode position 3 (tokens in flight)
    sched.update_from_output(s1, ModelRunnerOutput({"a": 11, "b": 21}))
    s3 = sched.schedule()                         # position 4 needs a second block: b is preempted
    assert b.status is RequestStatus.WAITING and b.num_output_placeholders == 1
    assert list(s3.num_scheduled_tokens) == ["a"]
    sched.update_from_output(s2, ModelRunnerOutput({"a": 12, "b": 22}))
    assert b.output_token_ids == [21, 22] and b.num_output_placeholders == 0
    sched.update_from_output(s3, ModelRunnerOutput({"a": 13}))
    assert a.output_token_ids == [11, 12, 13]


def test_a_request_ending_in_flight_gives_its_seat_to_the_next_at_once():
    """max_num_seqs=1: once a's tokens in flight reach max_tokens, b is admitted in the next
    schedule (as without the overlap), though a holds its blocks until its last token arrives."""
    sched, _ = make_scheduler(max_num_seqs=1, budget=32)
    a = add(sched, "a", [1, 2, 3], max_tokens=2, ignore_eos=True)
    b = add(sched, "b", [4, 5, 6], max_tokens=2, ignore_eos=True)
    s1 = sched.schedule()
    s2 = sched.schedule()                         # a: output 1 in flight, output 2 computed now
    assert list(s1.num_scheduled_tokens) == list(s2.num_scheduled_tokens) == ["a"]
    sched.update_from_output(s1, ModelRunnerOutput({"a": 7}))
    s3 = sched.schedule()                         # a's last token is in flight: b takes its seat
    assert s3.num_scheduled_tokens == {"b": 3} and b.status is RequestStatus.RUNNING
    assert sched.num_running == 2 and len(s3.num_scheduled_tokens) <= 1
    sched.update_from_output(s2, ModelRunnerOutput({"a": 8}))
    assert a.status is RequestStatus.FINISHED_LENGTH and sched.num_running == 1


# -- pipeline parallelism: steps in flight, none sharing a request (schedule(skip=...)) ----------
def drive_pipelined(sched, worker, depth: int, max_steps: int = 4000) -> tuple[dict[str, list[int]], int]:
    """Keep up to `depth` steps in flight (the fake worker runs a step when it is submitted, as the
    stages would, in order); read the oldest. Returns the outputs and the most steps in flight."""
    outputs, pipeline, peak = defaultdict(list), deque(), 0
    for _ in range(max_steps):
        while len(pipeline) < depth:
            busy = {rid for so, _ in pipeline for rid in so.num_scheduled_tokens}
            so = sched.schedule(skip=busy)
            if so.is_empty and not so.finished_req_ids:
                break
            assert not busy & set(so.num_scheduled_tokens), "a request in two in-flight steps"
            pipeline.append((so, worker.execute(so)))
        peak = max(peak, len(pipeline))
        if not pipeline:
            break
        so, out = pipeline.popleft()
        for req, toks in sched.update_from_output(so, out):
            outputs[req.request_id] += toks
    assert not sched.has_unfinished_requests(), "the scheduler stopped making progress"
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    return dict(outputs), peak


@pytest.mark.parametrize("depth,num_blocks", [(2, 64), (2, 12), (4, 12)])
def test_pipelined_steps_match_reference(depth, num_blocks):
    sched, worker = make_scheduler(num_blocks=num_blocks, max_num_seqs=4, budget=10, max_model_len=64)
    sched.max_unread_steps = depth + 1
    reqs = workload()
    for rid, prompt, params in reqs:
        add(sched, rid, prompt, **params)
    outputs, peak = drive_pipelined(sched, worker, depth)
    assert peak == depth
    for rid, prompt, params in reqs:
        assert outputs[rid] == reference(rid, prompt, SamplingParams(**params), 64), rid
    if num_blocks == 12:
        assert sched.num_preemptions > 0


def test_skip_leaves_requests_out_and_holds_the_queue_head():
    sched, _ = make_scheduler(max_num_seqs=4, budget=32)
    add(sched, "a", [1, 2, 3], max_tokens=4)
    first = sched.schedule()
    assert set(first.num_scheduled_tokens) == {"a"}
    add(sched, "b", [4, 5], max_tokens=4)
    second = sched.schedule(skip={"a"})
    assert set(second.num_scheduled_tokens) == {"b"}      # a is in flight: only b runs
    assert sched.schedule(skip={"a", "b"}).is_empty
