"""The L2 prefetch kernel (kernels/prefetch.py): the box it asks for, its argument checks, and on
the GPU that it changes nothing, eagerly and inside a CUDA graph (its reference does nothing)."""
from __future__ import annotations

import pytest
import torch

from pagedray.kernels import cuda_available, ops, prefetch

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_available()),
                                reason="needs a CUDA device and CuPy")


@pytest.mark.parametrize("layout, nbytes, expected", [
    ("rows", 3 * 8192, (3, 8192, 8192)),           # whole rows, from the first
    ("rows", 100, (1, 8192, 8192)),                # at least one row
    ("rows", 1 << 40, (64, 8192, 8192)),           # never past the tensor
    ("columns", 64 * 1024, (64, 8192, 1024)),      # the leading bytes of every row
    ("columns", 64 * 20, (64, 8192, 16)),          # at least 16 bytes a row, in 16-byte steps
    ("columns", 1 << 40, (64, 8192, 8192)),
])
def test_box(layout, nbytes, expected):
    assert prefetch.box(torch.empty(64, 4096, dtype=torch.bfloat16), nbytes, layout) == expected


@pytest.mark.parametrize("change, match", [
    ("1-d", "dimensions"), ("strided", "contiguous"), ("negative", "nbytes"), ("layout", "layout"),
    ("mode", "mode"), ("cpu", "CUDA device"),
])
def test_checks(change, match):
    w = torch.empty(8, 64, dtype=torch.bfloat16)
    args = dict(weight=w, nbytes=1024, layout="rows", mode=0)
    if change == "1-d":
        args["weight"] = w.view(-1)
    elif change == "strided":
        args["weight"] = w.t()
    elif change == "negative":
        args["nbytes"] = -1
    elif change == "layout":
        args["layout"] = "diagonal"
    elif change == "mode":
        args["mode"] = 7
    with pytest.raises(ValueError, match=match):
        prefetch.prefetch_l2(**args)


def test_ops_on_cpu_is_the_reference_no_op():
    w = torch.randn(8, 64)
    before = w.clone()
    assert ops.prefetch_l2(w, 1 << 20) is None
    assert torch.equal(w, before)


@needs_cuda
@pytest.mark.parametrize("mode", prefetch.MODES)
@pytest.mark.parametrize("layout", prefetch.LAYOUTS)
@pytest.mark.parametrize("nbytes", [0, 16, 40000, 1 << 22, 1 << 30])
def test_changes_nothing_eager_and_in_a_graph(mode, layout, nbytes):
    torch.manual_seed(nbytes % 1000 + mode)
    w = torch.randn(1000, 4104, device="cuda", dtype=torch.bfloat16)   # rows of 8208 bytes: a partial chunk
    before = w.clone()
    prefetch.prefetch_l2(w, nbytes, layout, mode)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        prefetch.prefetch_l2(w, nbytes, layout, mode)
        y = w.float().sum(dim=1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(w, before)
    torch.testing.assert_close(y, before.float().sum(dim=1))
