"""What a request becomes after its core died: the rest of each unfinished completion."""
from __future__ import annotations

from pagedray.cluster.core.messages import CoreOutput, CoreRequest, completion_id
from pagedray.cluster.core.validation import child_params
from pagedray.cluster.serving.migration import resume_requests
from pagedray.cluster.serving.output_processor import OutputProcessor
from pagedray.common.sampling_params import SamplingParams


def test_each_unfinished_completion_resumes_from_its_tokens_with_its_own_params():
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, prompt_logprobs=2)
    first = CoreRequest("r", [1, 2, 3], params, arrival_time=7.0)
    proc = OutputProcessor(None)
    state = proc.add_request("r", None, [1, 2, 3], params)
    proc.process_outputs([CoreOutput("r", 0, [4, 5]), CoreOutput("r", 1, [6], finish_reason="stop"),
                          CoreOutput("r", 2, [7])])
    resumed = resume_requests(first, state)
    assert [r.request_id for r in resumed] == [completion_id("r", 0), completion_id("r", 2)]
    assert [r.output_token_ids for r in resumed] == [[4, 5], [7]]
    for r, index in zip(resumed, (0, 2)):
        want = child_params(params, index)
        assert (r.params.n, r.params.seed, r.params.max_tokens) == (1, want.seed, 10)
        assert r.params.prompt_logprobs is None and r.prompt_token_ids == [1, 2, 3] and r.arrival_time == 7.0
    assert params.n == 3 and params.prompt_logprobs == 2      # the original is left as it was


def test_a_single_completion_keeps_its_request_id_and_params():
    params = SamplingParams(temperature=0.0, max_tokens=8)
    proc = OutputProcessor(None)
    state = proc.add_request("s", None, [9], params)
    proc.process_outputs([CoreOutput("s", 0, [1, 2, 3])])
    [r] = resume_requests(CoreRequest("s", [9], params), state)
    assert (r.request_id, r.output_token_ids, r.params.temperature, r.params.max_tokens) == ("s", [1, 2, 3], 0.0, 8)
