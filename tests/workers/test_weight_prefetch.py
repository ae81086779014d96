"""workers/weight_prefetch.py: the linear layers' run order, and what the prefetch branch asks for
while a graph is captured (the kernel itself: tests/kernels/test_prefetch.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pagedray.kernels import cuda_available, ops
from pagedray.models.layers.linear import ReplicatedLinear
from pagedray.workers import weight_prefetch

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_available()),
                                reason="needs a CUDA device and CuPy")


class Net(nn.Module):
    """Registered in one order (a, b, c), run in another (c, a, b), with a non-linear step between."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = ReplicatedLinear(16, 32), ReplicatedLinear(32, 16), ReplicatedLinear(16, 16)
        for p in self.parameters():
            nn.init.normal_(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(self.c(x))))


def test_order_is_the_run_order_not_the_registration_order():
    net = Net()
    order = weight_prefetch.linear_order(net, lambda: net(torch.randn(2, 16)))
    assert order == [net.c, net.a, net.b]
    assert not any(m._forward_pre_hooks for m in (net.a, net.b, net.c))   # recording hooks removed


def test_off_without_cuda_or_with_zero_bytes(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "prefetch_l2", lambda *a: calls.append(a))
    net = Net()
    order = [net.c, net.a, net.b]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with weight_prefetch.prefetching(order):
        net(torch.randn(2, 16))
    monkeypatch.undo()
    monkeypatch.setattr(ops, "prefetch_l2", lambda *a: calls.append(a))
    with weight_prefetch.prefetching(order, nbytes=0):
        net(torch.randn(2, 16))
    assert calls == [] and not any(m._forward_hooks for m in order)


@needs_cuda
def test_graph_prefetches_each_next_weight_and_keeps_results(monkeypatch):
    net = Net().cuda().to(torch.bfloat16)
    x = torch.randn(1, 16, device="cuda", dtype=torch.bfloat16)
    order = weight_prefetch.linear_order(net, lambda: net(x))
    eager = net(x)
    asked, real = [], ops.prefetch_l2
    monkeypatch.setattr(ops, "prefetch_l2", lambda w, n, *a: (asked.append((w, n)), real(w, n, *a)))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), weight_prefetch.prefetching(order, nbytes=1 << 20):
        out = net(x)
    graph.replay()
    torch.cuda.synchronize()
    assert [id(w) for w, _ in asked] == [id(net.a.weight), id(net.b.weight)]
    assert {n for _, n in asked} == {1 << 20}
    assert torch.equal(out, eager)
    assert not any(m._forward_hooks for m in order)
