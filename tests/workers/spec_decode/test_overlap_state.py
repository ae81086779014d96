"""The worker's side of overlapped speculative steps, message by message (no model): the tokens a
step emitted are appended at once and not again when the driver's delta repeats them; a step the
driver scheduled before reading the previous one starts after that step's accepted tokens; a request
resent whole (copy-on-write) while a step of it is unread keeps that step's tokens; a dropped request
forgets them."""
from __future__ import annotations

import torch
from testkit.scheduler_fakes import cached_data

from pagedray.common.messages import NewRequestData, SchedulerOutput
from pagedray.common.sampling_params import SamplingParams
from pagedray.common.speculative import SpeculativeConfig
from pagedray.workers.model_runner import ModelRunner
from pagedray.workers.spec_decode.runner import SpecDecodeRunner

P = [5, 6, 7, 8, 9]


def _runner() -> ModelRunner:
    runner = ModelRunner(torch.nn.Identity(), 4, torch.device("cpu"))
    runner.spec = SpecDecodeRunner(SpeculativeConfig(method="ngram", num_speculative_tokens=2))
    runner.spec.overlapped = True
    return runner


def _sched(new=(), cached=(), finished=(), drafts=None) -> SchedulerOutput:
    """cached: (req_id, new_token_ids, new_block_ids, num_computed_tokens) rows."""
    rids = [r.req_id for r in new] + [row[0] for row in cached]
    scheduled = {rid: 1 + len((drafts or {}).get(rid, ())) for rid in rids}
    return SchedulerOutput(list(new), cached_data(*cached), scheduled, sum(scheduled.values()),
                           set(finished), scheduled_spec_decode_tokens=dict(drafts or {}))


def _emit(runner: ModelRunner, tokens: list[int], num_drafts: int) -> None:
    runner.spec.emitted(runner, [("r", 0, [0] * num_drafts)], [tokens], {"r": [-1] * num_drafts})


def test_unread_steps_place_the_next_one_and_deltas_do_not_repeat_tokens():
    runner = _runner()
    params = SamplingParams(temperature=0)
    runner.update_states(_sched(new=[NewRequestData("r", list(P), len(P), params, [1, 2], 0)]))
    _emit(runner, [20], 0)                                  # step 1: the prefill samples 20
    # Step 2, scheduled before step 1 was read: no new tokens from the driver, 2 placeholder proposals.
    runner.update_states(_sched(cached=[("r", [], [], len(P))], drafts={"r": [-1, -1]}))
    state = runner.requests["r"]
    assert state.token_ids == P + [20] and state.num_computed_tokens == len(P)
    _emit(runner, [30, 31], 2)                              # step 2: one proposal accepted, one rejected
    # Step 3: the driver read step 1 (sends 20) but not step 2, whose 2 proposals it counted as computed.
    runner.update_states(_sched(cached=[("r", [20], [3], len(P) + 1 + 2)], drafts={"r": [-1, -1]}))
    assert state.token_ids == P + [20, 30, 31] and state.sampling_row.output_token_ids == [20, 30, 31]
    assert state.num_computed_tokens == len(P) + 2          # after 20 and the accepted 30: 31 runs next
    _emit(runner, [40], 2)                                   # step 3: both rejected
    # Copy-on-write resends it whole: the driver has read step 2 (its tokens and rejection) but not step 3.
    runner.update_states(_sched(new=[NewRequestData("r", P + [20, 30, 31], len(P), params, [1, 2, 3],
                                                    len(P) + 3 + 2)], finished=["r"], drafts={"r": [-1, -1]}))
    state = runner.requests["r"]
    assert state.token_ids == P + [20, 30, 31, 40] and state.sampling_row.output_token_ids == [20, 30, 31, 40]
    assert state.num_computed_tokens == len(P) + 3          # 40 runs next
    # The driver reads step 3 and the next delta repeats 40: appended once.
    runner.update_states(_sched(cached=[("r", [40], [], len(P) + 3)]))
    assert state.token_ids == P + [20, 30, 31, 40] and state.num_computed_tokens == len(P) + 3
    assert not runner.spec._unread
    # A request dropped with a step unread forgets it (its id may come back as a new request).
    _emit(runner, [50], 0)
    runner.update_states(_sched(finished=["r"]))
    assert not runner.spec._unread and "r" not in runner.requests
