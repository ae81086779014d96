"""Speculative decoding in the scheduler (torch-free): the n-gram lookup, proposals in the token
budget and in KV slots, the slots of rejected proposals given back, mixed batches, preemption.

A fake worker mirrors the runner's per-request state from the messages (including cut block tables),
writes every scheduled token — proposals too — into a fake paged cache, verifies proposals against a
deterministic "target" that reads its context back through the block table, and returns the accepted
prefix plus one token, as the real runner does.
"""
from collections import defaultdict

import pytest

from pagedray.cluster.config import SchedulerConfig
from pagedray.cluster.core.request import Request
from pagedray.cluster.core.scheduler import Scheduler
from pagedray.cluster.core.spec import ngram_propose
from pagedray.common.messages import ModelRunnerOutput, SchedulerOutput
from pagedray.common.sampling_params import SamplingParams
from pagedray.common.speculative import SpeculativeConfig

from testkit.scheduler_fakes import cached_rows

BS = 4


def target(ctx: list[int]) -> int:
    """Mostly copies the token 5 back (n-gram proposals are then often right), sometimes not."""
    return ctx[-5] if len(ctx) % 7 else (sum(ctx) * 31 + len(ctx)) % 50


class SpecWorker:
    def __init__(self, num_blocks: int) -> None:
        self.cache = [[None] * BS for _ in range(num_blocks)]
        self.reqs: dict[str, dict] = {}

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        for rid in so.finished_req_ids:
            self.reqs.pop(rid, None)
        for new in so.scheduled_new_reqs:
            self.reqs[new.req_id] = dict(tokens=list(new.token_ids), blocks=list(new.block_ids),
                                         computed=new.num_computed_tokens)
        for d in cached_rows(so.scheduled_cached_reqs):
            st = self.reqs[d.req_id]
            st["tokens"] += d.new_token_ids
            if d.block_start is not None:
                del st["blocks"][d.block_start:]
            st["blocks"] += d.new_block_ids
            st["computed"] = d.num_computed_tokens
        for src, dst in so.blocks_to_copy:
            self.cache[dst] = list(self.cache[src])
        inputs = {}
        for rid, n in so.num_scheduled_tokens.items():
            st = self.reqs[rid]
            drafts = so.scheduled_spec_decode_tokens.get(rid, [])
            seq = st["tokens"] + drafts
            assert n == len(drafts) + 1 if drafts else True
            for p in range(st["computed"], st["computed"] + n):
                self.cache[st["blocks"][p // BS]][p % BS] = seq[p]
            inputs[rid] = (st, n, drafts)
        sampled, accepted = {}, {}
        for rid, (st, n, drafts) in inputs.items():
            end = st["computed"] + n
            ctx = [self.cache[st["blocks"][p // BS]][p % BS] for p in range(end)]
            assert ctx == (st["tokens"] + drafts)[:end], f"{rid}: the cache does not hold its tokens"
            if end - len(drafts) < len(st["tokens"]):
                continue
            base = end - len(drafts)
            out = []
            for j in range(len(drafts) + 1):
                tok = target(ctx[:base + j])
                out.append(tok)
                if j == len(drafts) or tok != drafts[j]:
                    break
            sampled[rid], accepted[rid] = out[0], out
        return ModelRunnerOutput(sampled, accepted_token_ids=accepted)


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(target(tokens))
    return tokens[len(prompt):]


def make(num_blocks=64, budget=32, k=3, max_num_seqs=8, caching=False):
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=128)
    # (every step with proposals verifies: no back-off, cluster/core/spec_backoff.py)
    spec = SpeculativeConfig("ngram", k, prompt_lookup_min=1, prompt_lookup_max=3, backoff_after_failed_steps=0)
    return Scheduler(cfg, BS, num_blocks, caching, spec), SpecWorker(num_blocks)


def drive(sched: Scheduler, worker: SpecWorker, check=None) -> dict[str, list[int]]:
    outputs = defaultdict(list)
    for _ in range(2000):
        if not sched.has_unfinished_requests():
            break
        so = sched.schedule()
        assert so.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        for rid, drafts in so.scheduled_spec_decode_tokens.items():
            assert so.num_scheduled_tokens[rid] == len(drafts) + 1
        for req, toks in sched.update_from_output(so, worker.execute(so)):
            outputs[req.request_id] += toks
        if check:
            check(sched)
    bm = sched.block_manager
    assert not sched.has_unfinished_requests() and bm.num_free_blocks == bm.num_blocks, "stalled or leaked"
    return dict(outputs)


def test_ngram_propose_takes_the_latest_longest_match():
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 8, 2, 3]
    assert ngram_propose(toks, 1, 3, 2) == [7, 8]            # "2 3" last seen before 7 8
    assert ngram_propose([1, 2, 3, 4], 1, 3, 2) == []         # no earlier occurrence
    assert ngram_propose([5, 1, 5, 2, 5], 1, 1, 3) == [2, 5]  # the latest match of length 1
    assert ngram_propose([4, 4, 4], 2, 2, 5) == [4]           # the match overlaps the suffix
    assert ngram_propose([1, 2, 9, 2], 2, 3, 2) == []         # only a 1-gram matches, below the minimum


def _check_blocks(sched: Scheduler) -> None:
    """After each step a running request holds blocks for its computed tokens only (rejected slots
    given back), and the block manager's counts add up."""
    bm = sched.block_manager
    held = 0
    for req in sched.running:
        n = len(bm.get_block_ids(req.request_id))
        assert n == -(-req.num_computed_tokens // BS), (req, n)
        held += n
    assert held == bm.num_used_blocks


@pytest.mark.parametrize("budget", [32, 6])
def test_outputs_equal_the_target_and_rejected_slots_are_freed(budget):
    sched, worker = make(budget=budget)
    prompts = {f"r{i}": [3 + i, 4, 5, 6, 3 + i, 4, 5] for i in range(5)}
    for rid, prompt in prompts.items():
        sched.add_request(Request(rid, prompt, SamplingParams(max_tokens=25, ignore_eos=True)))
    got = drive(sched, worker, _check_blocks)
    assert got == {rid: reference(p, 25) for rid, p in prompts.items()}
    spec = sched.spec
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens   # both outcomes happened


def test_preemption_mid_speculation_and_prefix_caching():
    sched, worker = make(num_blocks=14, caching=True)
    prompts = {f"r{i}": [9, 8, 7, 6, 9, 8, 7, 6, i] for i in range(4)}
    for rid, prompt in prompts.items():
        sched.add_request(Request(rid, prompt, SamplingParams(max_tokens=20, ignore_eos=True)))
    got = drive(sched, worker)
    assert sched.num_preemptions > 0
    assert got == {rid: reference(p, 20) for rid, p in prompts.items()}


def test_proposals_respect_max_tokens_and_stop_tokens():
    sched, worker = make()
    prompt = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    sched.add_request(Request("a", prompt, SamplingParams(max_tokens=7, ignore_eos=True)))
    ref = reference(prompt, 30)
    sched.add_request(Request("b", prompt, SamplingParams(max_tokens=30, ignore_eos=True,
                                                          stop_token_ids=[ref[9]])))
    got = drive(sched, worker)
    assert got["a"] == ref[:7]
    assert got["b"] == ref[:ref.index(ref[9]) + 1]


def test_a_request_that_cannot_fit_with_the_lookahead_slots_is_refused(tmp_path):
    """A drafter reserves k lookahead slots: a request whose longest length plus them exceeds the
    whole cache could never run, and is refused when added (not left to stall)."""
    (tmp_path / "config.json").write_text("{}")
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)
    spec = SpeculativeConfig("draft_model", 4, model=str(tmp_path))
    sched = Scheduler(cfg, BS, 8, False, spec)                       # 32 slots
    sched.add_request(Request("fits", list(range(10)), SamplingParams(max_tokens=18)))   # 27 + 4 slots
    with pytest.raises(ValueError, match="lookahead"):
        sched.add_request(Request("too long", list(range(10)), SamplingParams(max_tokens=20)))  # 29 + 4


def test_verifying_requests_hold_their_adapters_slot():
    """LoRA at max_loras=1: a verifying request's adapter counts as any running request's, so no step
    mixes two adapters; the other adapter's request waits (a request without one runs meanwhile)."""
    from pagedray.common.lora import LoRARequest
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=128)
    spec = SpeculativeConfig("ngram", 3, prompt_lookup_min=1, prompt_lookup_max=3, backoff_after_failed_steps=0)
    sched, worker = Scheduler(cfg, BS, 64, False, spec, max_loras=1), SpecWorker(64)
    loras = {"a": LoRARequest("a", 1, "/a"), "b": LoRARequest("b", 2, "/b"), "none": None}
    prompts = {rid: [3 + i, 4, 5, 6, 3 + i, 4, 5] for i, rid in enumerate(loras)}
    for rid, prompt in prompts.items():
        sched.add_request(Request(rid, prompt, SamplingParams(max_tokens=12, ignore_eos=True),
                                  lora_request=loras[rid]))
    outputs, waited = defaultdict(list), 0
    while sched.has_unfinished_requests():
        so = sched.schedule()
        assert len({loras[r].lora_int_id for r in so.num_scheduled_tokens if loras[r]}) <= 1
        if so.scheduled_spec_decode_tokens.get("a") and "none" in so.num_scheduled_tokens:
            waited += any(r.request_id == "b" for r in sched.waiting)
        for req, toks in sched.update_from_output(so, worker.execute(so)):
            outputs[req.request_id] += toks
    assert waited > 0
    assert dict(outputs) == {rid: reference(p, 12) for rid, p in prompts.items()}


@pytest.mark.parametrize("case", [
    dict(),                                        # no stop among them: appended at once
    dict(eos=7),                                   # eos mid-way
    dict(eos=7, ignore_eos=True),
    dict(eos=7, min_tokens=6),                     # eos before min_tokens: not a stop
    dict(eos=6, min_tokens=2),                     # eos at exactly min_tokens
    dict(stop=[9, 8]),
    dict(max_tokens=3),                            # the length limit mid-way
    dict(max_tokens=5),                            # ... at the last one
])
def test_a_verification_appends_the_tokens_the_per_token_stops_keep(case):
    """`SpecDecoding.apply` appends a verification's tokens in one go when none can stop the request;
    it must equal appending them one by one with the scheduler's stop check."""
    sched, _ = make()
    params = SamplingParams(max_tokens=case.get("max_tokens", 50), ignore_eos=case.get("ignore_eos", False),
                            min_tokens=case.get("min_tokens", 0), stop_token_ids=case.get("stop"))
    params.eos_token_id = case.get("eos")
    tokens = [5, 6, 7, 8, 9]
    got_req, want_req = (Request(rid, [1, 2, 3], params) for rid in ("got", "want"))
    for req in (got_req, want_req):
        sched._set_stops(req)
    want, want_status = [], None
    for tok in tokens:
        want_req.append_output_token(tok)
        want.append(tok)
        want_status = sched._stop_status(want_req)
        if want_status is not None:
            break
    got, status = sched.spec.apply(got_req, list(tokens), 0, sched._stop_status)
    assert (got, status) == (want, want_status)
    assert got_req.output_token_ids == want and got_req.all_token_ids == [1, 2, 3] + want
    assert got_req.stop_reason == want_req.stop_reason


def _ngram_by_scan(tokens, lookup_min, lookup_max, k):
    """The lookup by its definition: every earlier end position, right to left."""
    n = len(tokens)
    best_len, best_end = 0, -1
    for i in range(n - 2, -1, -1):
        m = 0
        while m < lookup_max and i - m >= 0 and tokens[i - m] == tokens[n - 1 - m]:
            m += 1
        if m > best_len:
            best_len, best_end = m, i
            if m == lookup_max:
                break
    return tokens[best_end + 1:best_end + 1 + k] if best_len >= max(1, lookup_min) and n > lookup_min else []


def test_ngram_propose_equals_a_scan_of_every_position():
    import random
    rng = random.Random(0)
    for trial in range(400):
        tokens = [rng.randrange(rng.choice([2, 4, 30])) for _ in range(rng.randrange(1, 60))]
        lo = rng.randint(1, 3)
        hi = rng.randint(lo, 5)
        assert ngram_propose(tokens, lo, hi, 4) == _ngram_by_scan(tokens, lo, hi, 4), (tokens, lo, hi)
