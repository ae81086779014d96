"""ModelRunner.prepare_inputs' decode pass (`_decode_rows`: map/numpy over the step's requests) gives
the inputs of the general per-request pass: every token known (the serial loop), every token in
flight (the overlapped loop), a mix of both, and it hands a one-token prompt chunk to the general pass."""
from __future__ import annotations

import pytest
import torch

from pagedray.common.messages import CachedRequestData, NewRequestData, SchedulerOutput
from pagedray.common.sampling_params import SamplingParams
from pagedray.workers.model_runner import ModelRunner
from pagedray.workers.sampler import DeviceSample
from pagedray.workers.step_output import StepOutput

BS = 4
# (request, known tokens, computed tokens, block ids)
REQS = [("a", 9, 8, [3, 7, 1]), ("b", 5, 4, [2, 4]), ("c", 12, 11, [5, 6, 8]), ("d", 4, 3, [9])]


def _runner() -> ModelRunner:
    runner = ModelRunner(torch.nn.Identity(), BS, torch.device("cpu"))
    new = [NewRequestData(rid, list(range(10, 10 + n)), 3, SamplingParams(temperature=0.0), blocks, done)
           for rid, n, done, blocks in REQS]
    runner.update_states(SchedulerOutput(new, CachedRequestData(), {}, 0))
    return runner


def _decode(ids) -> SchedulerOutput:
    return SchedulerOutput([], CachedRequestData(), {rid: 1 for rid in ids}, len(ids))


def _both(runner: ModelRunner, sched: SchedulerOutput):
    fast = runner.prepare_inputs(sched)
    runner._decode_rows = lambda s: None        # the general pass
    general = runner.prepare_inputs(sched)
    del runner._decode_rows
    return fast, general


def _same(fast, general) -> None:
    for name in ("input_ids", "positions"):
        assert torch.equal(getattr(fast, name), getattr(general, name)), name
    fm, gm = fast.attn_metadata, general.attn_metadata
    for name in ("slot_mapping", "block_tables", "seq_lens", "query_start_loc"):
        assert torch.equal(getattr(fm, name), getattr(gm, name)), name
    assert (fm.seq_lens_list, fm.query_lens_list, fm.max_query_len, fm.max_seq_len) == \
        (gm.seq_lens_list, gm.query_lens_list, gm.max_query_len, gm.max_seq_len)
    assert fast.sample_req_ids == general.sample_req_ids and fast.sample_rows is general.sample_rows is None
    assert fast.pending_req_ids == general.pending_req_ids and fast.prompt_spans == general.prompt_spans


def _in_flight(runner: ModelRunner, ids: list[str], last_ids: list[str]) -> None:
    """The previous step sampled `last_ids` (ids 500, 501, ...), not read yet: `ids` are one token ahead."""
    for rid in ids:
        runner.requests[rid].num_computed_tokens += 1
    runner.last_output = StepOutput(last_ids, DeviceSample(torch.arange(500, 500 + len(last_ids)), None,
                                                           [None] * len(last_ids)))


@pytest.mark.parametrize("order", [["a", "b", "c", "d"], ["d", "b", "a"]])
def test_every_token_known(order):
    runner = _runner()
    fast, general = _both(runner, _decode(order))
    _same(fast, general)
    assert fast.input_ids.tolist() == [10 + dict((r, d) for r, _, d, _ in REQS)[rid] for rid in order]


def test_every_token_in_flight_is_gathered_from_the_last_samples():
    runner = _runner()
    _in_flight(runner, ["a", "b", "c", "d"], ["c", "a", "d", "b"])
    fast, general = _both(runner, _decode(["a", "b", "c", "d"]))
    _same(fast, general)
    assert fast.input_ids.tolist() == [501, 503, 500, 502] and fast.pending_req_ids == ["a", "b", "c", "d"]


def test_known_and_in_flight_mixed():
    runner = _runner()
    _in_flight(runner, ["b", "d"], ["d", "x", "b"])
    fast, general = _both(runner, _decode(["a", "b", "c", "d"]))
    _same(fast, general)
    assert fast.input_ids.tolist() == [18, 502, 21, 500] and fast.pending_req_ids == ["b", "d"]


def test_a_one_token_prompt_chunk_takes_the_general_pass():
    runner = _runner()
    runner.requests["c"].num_computed_tokens = 6     # 12 known: this token does not sample
    assert runner._decode_rows(_decode(["a", "c"])) is None
    inputs = runner.prepare_inputs(_decode(["a", "c"]))
    assert inputs.sample_req_ids == ["a"] and inputs.input_ids.tolist() == [18, 16]


def test_a_missing_sample_is_reported_by_the_general_pass():
    runner = _runner()
    _in_flight(runner, ["a"], ["b"])
    with pytest.raises(RuntimeError, match="previous step did not sample it"):
        runner.prepare_inputs(_decode(["a", "b"]))
