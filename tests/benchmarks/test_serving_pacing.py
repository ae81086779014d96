"""benchmarks/serving.py --compare-pacing: the mean running batch and the decode-only step it reads
from client-side token times."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("benchmark_serving", REPO / "benchmarks" / "serving.py")
serving = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = serving   # (its dataclasses look their module up)
_spec.loader.exec_module(serving)


def _result(start: float, first: float, step: float, n: int) -> "serving.RequestResult":
    times = [first + i * step for i in range(n)]
    return serving.RequestResult(first - start, step, times[-1] - start, [0] * n, start, times)


def test_mean_running_batch_counts_streams_between_first_and_last_token():
    # Two streams decoding over [1, 11] and one over [6, 11]: 2 over the first half, 3 over the second.
    results = [_result(0.0, 1.0, 0.1, 101), _result(0.5, 1.0, 0.1, 101), _result(5.5, 6.0, 0.1, 51)]
    assert serving.mean_running_batch(results, trim=0.0) == pytest.approx(2.5, rel=1e-6)
    assert serving.mean_running_batch(results, trim=0.25) == pytest.approx(2.5, rel=1e-6)


def test_decode_only_step_reads_the_window_where_every_request_decodes():
    # Prefill staggers the first tokens (1.0 .. 1.3); afterwards a token every 8 ms for all.
    results = [_result(0.0, 1.0 + 0.1 * i, 0.008, 200) for i in range(4)]
    assert serving.decode_only_step(results) == pytest.approx(0.008, rel=0.02)
