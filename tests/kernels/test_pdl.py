"""Programmatic dependent launch (kernels/_pdl.py, common.cuh's pdl_enter).

On CPU: every CUDA kernel of this folder waits for the kernels before it as its first statement
(a kernel that did not could read its inputs before they are written, or finish before its
predecessor and so break the next kernel's wait), and the driver structures have the layout of
cuda.h. On a GPU: a chain of dependent kernels, eager and replayed from a CUDA graph, gives the
same bits with PDL on as with plain launches, and PDL stayed on.
"""
from __future__ import annotations

import ctypes
import pathlib
import re

import pytest
import torch

from pagedray.kernels import _compile, _pdl, cuda_available, ops

KERNELS = pathlib.Path(_compile.__file__).resolve().parent
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_available()),
                                reason="needs a CUDA device and CuPy")


def _kernel_bodies():
    for path in sorted(KERNELS.glob("*.cu")):
        text = path.read_text()
        for match in re.finditer(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text):
            body = text.index(") {", match.end()) + 3
            yield path.name, match.group(1), text[body:body + 2000]


def test_every_kernel_waits_for_its_predecessors_before_anything_else():
    found = list(_kernel_bodies())
    assert len(found) >= 10, found
    for filename, name, body in found:
        statements = [line.strip() for line in body.splitlines() if line.strip() and not line.strip().startswith("//")]
        assert "pdl_enter();" in statements, f"{filename}:{name} never calls pdl_enter()"
        head = statements[:statements.index("pdl_enter();")]
        # The skinny GEMM first sends its weights (which no kernel writes) into L2: its head only
        # computes addresses and prefetches (read by eye: no loads, no stores).
        if name == "skinny_gemm":
            assert all("ld" not in s and "out[" not in s for s in head), head
        else:
            assert head == [], f"{filename}:{name} runs {head[:2]} before pdl_enter()"


def test_driver_structures_match_cuda_h():
    assert ctypes.sizeof(_pdl._Attr) == 72      # id + pad to 8 + 64-byte value union
    assert ctypes.sizeof(_pdl._Config) == 56    # 7 uints, stream, attrs pointer, numAttrs
    assert _pdl._Config.stream.offset == 32 and _pdl._Config.num_attrs.offset == 48


def _chain(x, residual, norm_w, w1, w2):
    h, r = ops.fused_add_rms_norm(x, residual, norm_w, 1e-6)
    y = ops.silu_and_mul(ops.linear(h, w1))
    return ops.linear(y, w2) + r


@needs_cuda
@pytest.mark.parametrize("tokens", [1, 2, 16])
def test_pdl_chain_matches_plain_launches_eager_and_in_a_graph(monkeypatch, tokens):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x, residual = (torch.randn(tokens, 1024, device=dev).to(dt) for _ in range(2))
    norm_w = torch.rand(1024, device=dev).to(dt)
    w1 = (torch.randn(2 * 2816, 1024, device=dev) / 32).to(dt)
    w2 = (torch.randn(1024, 2816, device=dev) / 53).to(dt)
    monkeypatch.setattr(_compile, "PDL", False)
    plain = _chain(x, residual, norm_w, w1, w2)
    monkeypatch.setattr(_compile, "PDL", True)
    eager = _chain(x, residual, norm_w, w1, w2)
    _chain(x, residual, norm_w, w1, w2)  # warm-up on the capture stream's allocator
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = _chain(x, residual, norm_w, w1, w2)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(eager, plain) and torch.equal(replayed, plain)
    if torch.cuda.get_device_capability() >= (9, 0):
        assert _pdl.usable(torch.cuda.current_device()), "PDL turned itself off (see the warning)"


def test_argument_layout_is_c_layout():
    """The kernel parameters are packed into one buffer at the offsets a C struct of them has."""
    import numpy as np
    types = (np.uint64, np.int32, np.uint64, np.int64, np.int32, np.float32, np.int32)
    fields = [(f"a{i}", {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32,
                         np.float32: ctypes.c_float}[t]) for i, t in enumerate(types)]
    struct_type = type("Args", (ctypes.Structure,), {"_fields_": fields})
    _, offsets = _pdl._layout(types)
    assert offsets == tuple(getattr(struct_type, name).offset for name, _ in fields)
