"""Launcher of the L2 prefetch kernel (prefetch.cu): a hint that the first bytes of a weight
will be read soon. Its reference is doing nothing (`reference.prefetch_l2`): the kernel writes
nothing, so results never depend on it, only timings.
"""
from __future__ import annotations

import torch

from pagedray.kernels import _compile as C

MODES = (0, 1)  # 0: bulk prefetch (sm_90+), 1: one prefetch per 128-byte line
LAYOUTS = ("rows", "columns")
THREADS, MAX_CTAS = 128, 64


def box(weight: torch.Tensor, nbytes: int, layout: str) -> tuple[int, int, int]:
    """(rows, pitch, width) in bytes of the part of a 2-D weight to prefetch: its first rows
    ("rows": what a GEMV reading whole rows, one warp a row, starts on) or the leading columns of
    every row ("columns": what a GEMM walking k across all rows at once starts on); about nbytes."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n, k = weight.shape
    pitch = k * weight.element_size()
    nbytes = min(nbytes, n * pitch)
    if layout == "rows":
        return max(1, nbytes // pitch), pitch, pitch
    width = max(16, nbytes // n // 16 * 16)
    return n, pitch, min(width, pitch)


def prefetch_l2(weight: torch.Tensor, nbytes: int, layout: str = "rows", mode: int = 0) -> None:
    """Ask L2 for about nbytes of weight [N, K] (dense, 16-byte aligned rows), laid out by
    `layout` (see `box`). Asynchronous and capturable; nbytes 0 launches nothing."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    C.check_dim("weight", weight, 2)
    C.check_contiguous("weight", weight)
    if not C.aligned16(weight):
        raise ValueError("weight must be 16-byte aligned (base address and row stride)")
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows, pitch, width = box(weight, nbytes, layout)
    C.check_cuda("weight", weight)
    if nbytes == 0 or weight.numel() == 0:
        return
    dev = C.device_of(weight)
    kernel = C.get_kernel("prefetch.cu", "prefetch_l2", dev, MODE=mode)
    chunks = rows * -(-width // 16384)
    grid = (max(1, min(MAX_CTAS, -(-chunks // THREADS))),)
    C.launch(kernel, grid, (THREADS,), (C.ptr(weight), C.i64(rows), C.i64(pitch), C.i64(width)), dev)
