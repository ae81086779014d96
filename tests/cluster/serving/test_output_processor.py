"""OutputProcessor fed hand-made core deltas: text, deltas vs cumulative, stop strings, n > 1."""
from __future__ import annotations

import pytest

from testkit.tiny_tokenizer import make_tiny_tokenizer

from pagedray.cluster.core.messages import CoreOutput, completion_id
from pagedray.cluster.serving.output_processor import OutputProcessor
from pagedray.common.sampling_params import SamplingParams

TEXT = "Hello, my name is Ada and I like paged attention."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"), 320)


def _feed(proc: OutputProcessor, rid: str, ids: list[int], index: int = 0, last: str | None = "length",
          logprobs: bool = False):
    """One core output per token; returns each step's ProcessedOutputs."""
    steps = []
    for i, t in enumerate(ids):
        out = CoreOutput(rid, index, [t], finish_reason=last if i == len(ids) - 1 else None,
                         new_logprobs=[[(t, -0.5, 1), (t + 1, -1.5, 2)]] if logprobs else None)
        steps.append(proc.process_outputs([out]))
    return steps


def test_deltas_add_up_to_the_cumulative_output_and_to_the_full_decode(tok):
    ids = tok.encode(TEXT)
    proc = OutputProcessor(tok)
    state = proc.add_request("a", "p", [1, 2], SamplingParams(max_tokens=len(ids), logprobs=1))
    deltas = []
    for i in range(len(ids)):
        [step] = _feed(proc, "a", ids[i:i + 1], last="length" if i == len(ids) - 1 else None, logprobs=True)
        assert step.advanced == [state] and not step.reqs_to_abort
        deltas.append(state.make_output(delta=True))
    assert "".join(d.outputs[0].text for d in deltas) == TEXT
    assert sum((d.outputs[0].token_ids for d in deltas), []) == ids
    assert all(len(d.outputs[0].token_ids) == 1 for d in deltas)        # deltas, not copies
    assert [d.finished for d in deltas] == [False] * (len(ids) - 1) + [True]
    full = state.make_output(delta=False)
    assert full.outputs[0].text == TEXT and full.outputs[0].token_ids == ids
    assert full.outputs[0].logprobs[0] == {ids[0]: -0.5, ids[0] + 1: -1.5}
    assert not proc.has_unfinished_requests()


def test_a_delta_built_late_coalesces_every_step_since_the_last(tok):
    ids = tok.encode(TEXT)
    proc = OutputProcessor(tok)
    state = proc.add_request("a", None, [1], SamplingParams(max_tokens=len(ids)))
    _feed(proc, "a", ids[:5], last=None)
    first = state.make_output(delta=True)
    _feed(proc, "a", ids[5:])
    second = state.make_output(delta=True)
    assert first.outputs[0].token_ids == ids[:5] and second.outputs[0].token_ids == ids[5:]
    assert first.outputs[0].text + second.outputs[0].text == TEXT
    assert state.make_output(delta=True).outputs == []     # nothing new: nothing sent again



def test_text_is_decoded_only_when_an_output_is_built(tok):
    """Without stop strings a completion's text waits for make_output (LLM.generate builds one, at
    the end): no decode per step, and the text is the streamed one."""
    ids = tok.encode(TEXT)
    proc = OutputProcessor(tok)
    state = proc.add_request("a", None, [1], SamplingParams(max_tokens=len(ids)))
    calls = []
    detok = state.completions[0].detokenizer
    original = detok.add_tokens
    detok.add_tokens = lambda *a, **k: calls.append(a) or original(*a, **k)
    _feed(proc, "a", ids)
    assert calls == [] and state.finished
    out = state.make_output(delta=False)
    assert len(calls) == 1 and out.outputs[0].text == TEXT and out.outputs[0].finish_reason == "length"


def test_a_stop_string_ends_the_completion_and_asks_for_its_abort(tok):
    ids = tok.encode(TEXT)
    proc = OutputProcessor(tok)
    state = proc.add_request("s", None, [1], SamplingParams(max_tokens=100, stop=["name"]))
    steps = _feed(proc, "s", ids, last=None)
    hit = next(i for i, s in enumerate(steps) if s.reqs_to_abort)
    assert steps[hit].reqs_to_abort == ["s"] and all(not s.advanced for s in steps[hit + 1:])
    out = state.make_output(delta=False).outputs[0]
    assert out.text == "Hello, my " and out.finish_reason == "stop"
    assert not proc.has_unfinished_requests()


def test_a_stop_token_is_kept_in_token_ids_but_not_in_the_text(tok):
    ids = tok.encode("Hello") + [2]    # </s>
    proc = OutputProcessor(tok)
    state = proc.add_request("e", None, [1], SamplingParams(skip_special_tokens=False))
    _feed(proc, "e", ids, last="stop")
    out = state.make_output(delta=False).outputs[0]
    assert out.text == "Hello" and out.token_ids == ids and out.finish_reason == "stop"


def test_n_completions_group_into_one_request_and_finish_separately(tok):
    a, b = tok.encode("Paris is"), tok.encode("Rome, Italy")
    proc = OutputProcessor(tok)
    state = proc.add_request("n", None, [1], SamplingParams(n=2, stop=["Italy"]))
    step = proc.process_outputs([CoreOutput("n", 0, a[:1]), CoreOutput("n", 1, b[:1])])
    assert step.advanced == [state]                        # one request, both completions
    assert [c.index for c in state.make_output(delta=True).outputs] == [0, 1]
    proc.process_outputs([CoreOutput("n", 0, a[1:], finish_reason="length")])
    delta = state.make_output(delta=True)
    assert [c.index for c in delta.outputs] == [0] and not delta.finished   # only what changed
    step = proc.process_outputs([CoreOutput("n", 1, b[1:])])
    assert step.reqs_to_abort == [completion_id("n", 1)]   # the stop string ended completion 1 alone
    final = state.make_output(delta=False)
    assert final.finished and [c.text for c in final.outputs] == ["Paris is", "Rome, "]


def test_abort_and_a_core_refusal(tok):
    proc = OutputProcessor(tok)
    proc.add_request("x", None, [1], SamplingParams())
    [state] = proc.abort_requests(["x", "unknown"])
    assert state.finished and state.make_output(delta=False).outputs[0].finish_reason == "abort"
    refused = proc.add_request("y", None, [1], SamplingParams())
    proc.process_outputs([CoreOutput("y", 0, [], finish_reason="abort", error="too long")])
    assert refused.finished and refused.error == "too long"
