"""Qwen2's per-layer sliding window from transformers 4.x configs (no `layer_types`);
the 5.x path is covered against HF by the conformance kit."""
from __future__ import annotations

from types import SimpleNamespace

from pagedray.models.qwen2 import layer_sliding_window


def test_sliding_window_from_max_window_layers():
    old = SimpleNamespace(sliding_window=8, use_sliding_window=True, max_window_layers=2)
    assert [layer_sliding_window(old, i) for i in range(4)] == [None, None, 8, 8]
    off = SimpleNamespace(sliding_window=8, use_sliding_window=False, max_window_layers=0)
    assert [layer_sliding_window(off, i) for i in range(2)] == [None, None]
    new = SimpleNamespace(sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    assert [layer_sliding_window(new, i) for i in range(2)] == [8, None]
