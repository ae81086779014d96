"""Launcher of the one-pass sampling kernel (sample.cu): greedy and temperature-only random rows.

Same function as `reference.race_sample`; see sample.cu for the math and the launch shape.
"""
from __future__ import annotations

import torch

from pagedray.kernels import _compile as C

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KEY_DTYPES = {torch.int64: "i64", torch.int32: "int"}
THREADS = 256          # sample.cu's THREADS
CTAS_PER_SM = 4        # sample.cu's __launch_bounds__ minimum: one wave of rows x splits CTAs
MAX_ROWS = 65535       # grid.y
_empty = torch.empty   # tests swap this to poison freshly allocated outputs

# Per device: (partial winners int64 [>= rows * splits], ticket counters int32 [>= rows], zero).
# Every launch leaves the counters at zero; launches on one stream never overlap.
_SCRATCH: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def splits_for(rows: int, num_vectors: int, num_sms: int) -> int:
    """CTAs per row: fill one wave of CTAS_PER_SM per SM, at least one vector per thread each."""
    by_rows = (CTAS_PER_SM * num_sms) // max(1, rows)
    by_work = num_vectors // THREADS
    return max(1, min(by_rows, by_work))


def _scratch(device: torch.device, rows: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    partial, counters = _SCRATCH.get(device, (None, None))
    if partial is None or partial.numel() < rows * splits or counters.numel() < rows:
        # Grown to the largest shape seen; the old buffers stay valid for kernels still queued.
        need_p = max(rows * splits, 0 if partial is None else partial.numel())
        need_c = max(rows, 0 if counters is None else counters.numel())
        partial = torch.empty(need_p, dtype=torch.int64, device=device)
        counters = torch.zeros(need_c, dtype=torch.int32, device=device)
        _SCRATCH[device] = (partial, counters)
    return partial, counters


def _check(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor,
           out: torch.Tensor | None) -> None:
    C.check_cuda("logits", logits)
    C.check_dtype("logits", logits, *DTYPES)
    C.check_dim("logits", logits, 2)
    rows, vocab = logits.shape
    if vocab < 1 or vocab >= 2 ** 31:
        raise ValueError(f"logits must have a vocabulary of 1 to 2**31 - 1 tokens, got {vocab}")
    if vocab > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must be dense in its last dimension, got strides {logits.stride()}")
    if rows > MAX_ROWS:
        raise ValueError(f"logits must have at most {MAX_ROWS} rows, got {rows}")
    dev = logits.device
    C.check_cuda("temperatures", temperatures, dev)
    C.check_dtype("temperatures", temperatures, torch.float32)
    C.check_shape("temperatures", temperatures, (rows,))
    C.check_cuda("keys", keys, dev)
    C.check_dtype("keys", keys, *KEY_DTYPES)
    C.check_shape("keys", keys, (rows, 2))
    if out is not None:
        C.check_cuda("out", out, dev)
        C.check_dtype("out", out, torch.int64)
        C.check_shape("out", out, (rows,))


def race_sample(logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits [R, V] (bf16/fp16/fp32, dense rows, any row stride): the argmax
    for rows whose temperature [R] (float32) is <= 0, else a draw from softmax(logits / T) by the
    exponential race keyed by keys [R, 2] (int64: the low 32 bits of each; or int32). Returns int64 [R].
    Nothing waits for the device."""
    _check(logits, temperatures, keys, out)
    rows, vocab = logits.shape
    out = _empty(rows, dtype=torch.int64, device=logits.device) if out is None else out
    if rows == 0:
        return out
    vec = 16 // logits.element_size()
    if vocab < vec or not C.aligned16(logits):
        vec = 1
    dev = C.device_of(logits)
    splits = splits_for(rows, vocab // vec, C.num_sms(dev))
    partial, counters = _scratch(dev, rows, splits)
    kernel = C.get_kernel("sample.cu", "race_sample", dev, SCALAR_T=C.CTYPE[logits.dtype], VEC=vec,
                          KEY_T=KEY_DTYPES[keys.dtype])
    C.launch(kernel, (splits, rows), (THREADS,),
             (C.ptr(out), C.ptr(logits), C.ptr(temperatures), C.ptr(keys), C.ptr(partial), C.ptr(counters),
              C.i64(logits.stride(0)), C.i32(vocab)), dev)
    return out
