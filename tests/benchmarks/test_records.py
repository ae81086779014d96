"""benchmarks/records.py: a record round-trips, the page shows the newest per card and workload, and
the committed RESULTS.md is what the committed records give."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("benchmark_records", REPO / "benchmarks" / "records.py")
records = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(records)


def _record(value: float, date: str, card: str = "NVIDIA H200"):
    return records.make_record("throughput", "llama3-8b, 1000 x 256/256", {"req/s": value, "time (s)": 16.2},
                               card=card, commit="abc1234", command="python benchmarks/throughput.py",
                               date=date, anchors={"target": "≥ 60 req/s"})


def test_newest_record_per_card_and_workload_is_shown(tmp_path):
    for value, date, card in ((50.1, "2026-12-01 18:00 UTC", "NVIDIA H200"), (61.7, "2026-12-02 00:07 UTC", "NVIDIA H200"),
                              (40.0, "2026-12-03 00:00 UTC", "NVIDIA H100 80GB HBM3")):
        records.write(_record(value, date, card), tmp_path)
    loaded = records.load(tmp_path)
    assert len(loaded) == 3 and loaded[0]["figures"]["req/s"] in (50.1, 61.7, 40.0)
    page = records.render(loaded)
    assert "**61.70** req/s" in page and "50.10" not in page and "**40.00** req/s" in page
    assert page.index("## NVIDIA H100 80GB HBM3") < page.index("## NVIDIA H200")
    assert "target ≥ 60 req/s" in page


def test_a_record_needs_figures_or_a_table():
    with pytest.raises(ValueError, match="needs a figure or a table"):
        records.make_record("gemv", "w", {}, card="c", commit="x", command="cmd")
    with pytest.raises(ValueError, match="headline 'ms' is not among the figures"):
        records.make_record("gemv", "w", {"us": 1.0}, card="c", commit="x", command="cmd", headline="ms")


def test_results_page_is_generated_from_the_committed_records():
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == records.render(records.load()), \
        "benchmarks/RESULTS.md is stale: run python benchmarks/records.py"
