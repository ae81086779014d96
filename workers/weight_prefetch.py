"""L2 prefetch of the next projection's weight inside decode graphs.

At decode's few tokens every projection streams its weight from DRAM, and between two
projections the GPU runs small latency-bound kernels (norm, rotary and cache write, attention,
the gated activation) that leave DRAM idle; the next projection then pays a ramp before its
loads flow. While a graph is captured, each linear layer's forward is followed by a branch that
asks L2 for the first bytes of the next linear layer's weight (kernels/prefetch.py): the fetch
runs beside the small kernels, and the projection starts on lines already in L2. The branch
joins the main stream after that next projection, so nothing waits for it.

Execution order of the linear layers is recorded on an eager warm-up forward. Results never
change (the kernel writes nothing); BYTES = 0 turns it off.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from pagedray.kernels import ops
from pagedray.models.layers.linear import LinearBase

BYTES = 16 << 20   # per weight; a quarter to a half of an H100/H200's 50 MB L2
LAYOUT = "rows"    # kernels/prefetch.py: box(); "rows" suits the GEMV, "columns" a GEMM walking k
MODE = 0           # kernels/prefetch.py: MODES


def linear_order(model: torch.nn.Module, forward: Callable[[], object]) -> list[LinearBase]:
    """The linear layers of `model` in the order one call of `forward` runs them."""
    order: list[LinearBase] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _args: order.append(mod))
             for m in model.modules() if isinstance(m, LinearBase)]
    try:
        forward()
    finally:
        for h in hooks:
            h.remove()
    return order


@contextlib.contextmanager
def prefetching(order: list[LinearBase], nbytes: int | None = None) -> Iterator[None]:
    """While open (around a graph capture), each linear layer in `order` forks the prefetch of
    the next one's weight onto a side stream, joined back after that next layer."""
    nbytes = BYTES if nbytes is None else nbytes
    if nbytes <= 0 or len(order) < 2 or not torch.cuda.is_available():
        yield
        return
    side = torch.cuda.Stream()
    following = {id(m): order[i + 1] for i, m in enumerate(order[:-1])}
    forked = [False]

    def after(module, _args, _output) -> None:
        main = torch.cuda.current_stream()
        if forked[0]:
            main.wait_stream(side)
            forked[0] = False
        nxt = following.get(id(module))
        if nxt is None:
            return
        side.wait_stream(main)
        with torch.cuda.stream(side):
            ops.prefetch_l2(nxt.weight, nbytes, LAYOUT, MODE)
        forked[0] = True

    hooks = [m.register_forward_hook(after) for m in set(order)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        if forked[0]:
            torch.cuda.current_stream().wait_stream(side)
