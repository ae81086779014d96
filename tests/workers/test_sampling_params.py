"""SamplingParams: vLLM's defaults, normalisation, and a ValueError naming each bad field."""
from __future__ import annotations

import math

import pytest

from pagedray.cluster import SamplingParams as ReExported
from pagedray.common.sampling_params import SamplingParams


def test_vllm_defaults_and_reexport():
    p = SamplingParams()
    assert ReExported is SamplingParams
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.seed, p.stop, p.stop_token_ids, p.ignore_eos) == (None, [], [], False)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.skip_special_tokens is True and not p.greedy


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert SamplingParams(max_tokens=None).max_tokens is None
    assert SamplingParams(min_tokens=4, max_tokens=4).min_tokens == 4


def test_clone_is_deep():
    p = SamplingParams(stop=["x"])
    q = p.clone()
    q.stop.append("y")
    assert p.stop == ["x"]


BAD = [
    ("n", 0), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", math.nan),
    ("top_k", -2), ("top_k", 2.0),
    ("min_p", -0.01), ("min_p", 1.5),
    ("presence_penalty", 2.5), ("presence_penalty", -2.1),
    ("frequency_penalty", 3.0), ("frequency_penalty", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("seed", 1.5), ("seed", "7"),
    ("stop", [""]), ("stop", [3]), ("stop", 3),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["2"]), ("stop_token_ids", 5),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0),
    ("min_tokens", -1),
    ("logprobs", -1), ("logprobs", 1.0),
    ("prompt_logprobs", -1),
    ("ignore_eos", 1), ("skip_special_tokens", None),
]


@pytest.mark.parametrize("field,value", BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens must be <= max_tokens.*min_tokens=5.*max_tokens=4"):
        SamplingParams(min_tokens=5, max_tokens=4)


def test_accepted_edges():
    for kwargs in [dict(top_p=1e-9), dict(min_p=0.0), dict(min_p=1.0), dict(presence_penalty=-2.0),
                   dict(frequency_penalty=2.0), dict(repetition_penalty=5.0), dict(seed=-3),
                   dict(seed=2**63 - 1), dict(seed=-2**63), dict(logprobs=0), dict(prompt_logprobs=0), dict(top_k=1)]:
        SamplingParams(**kwargs)
