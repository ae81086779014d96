"""What SamplingParams accepts, the core's msgpack wire carries: every integer field at the edge of its
range and text of every plane encode and decode unchanged; one step past an edge is a ValueError naming
the field, raised where the value is parsed (never an encoding failure on the way to a core)."""
from __future__ import annotations

import pytest

from pagedray.cluster.core.messages import CoreRequest
from pagedray.cluster.core.process import Wire
from pagedray.cluster.core.validation import child_params
from pagedray.common.sampling_params import INT64_MAX, INT64_MIN, SamplingParams

EDGES = dict(n=INT64_MAX, top_k=INT64_MAX, seed=INT64_MIN, max_tokens=INT64_MAX, min_tokens=INT64_MAX,
             logprobs=INT64_MAX, prompt_logprobs=INT64_MAX, stop_token_ids=[0, INT64_MAX],
             stop=["日本語", "\U0001f600", "\x00"])


def test_every_accepted_value_crosses_the_wire():
    wire = Wire()
    params = SamplingParams(**EDGES)
    sent = [CoreRequest("r", [1, 2, 3], params), CoreRequest("s", [4], child_params(SamplingParams(seed=INT64_MAX), 7))]
    got = wire.requests.decode(wire.encode(sent))
    assert got == sent
    assert INT64_MIN <= sent[1].params.seed <= INT64_MAX   # a derived sample seed stays in range too


@pytest.mark.parametrize("field, value", [
    ("n", INT64_MAX + 1), ("top_k", 10 ** 20), ("seed", INT64_MAX + 1), ("seed", INT64_MIN - 1),
    ("max_tokens", 2 ** 64), ("min_tokens", 10 ** 20), ("logprobs", 2 ** 70), ("prompt_logprobs", 2 ** 64),
    ("stop_token_ids", [10 ** 20]), ("stop", ["a\ud800"]),
])
def test_one_step_past_an_edge_is_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SamplingParams(**{field: value})
