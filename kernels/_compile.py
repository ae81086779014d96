"""Run-time compilation (NVRTC through CuPy), launch plumbing and argument checks.

Each `.cu` file in this folder is compiled once per (device, constants) —
constants being the dtype and the shape parameters baked in with -D options —
and the resulting CuPy kernels are cached for the life of the process (CuPy
also keeps the binaries in its on-disk cache). Kernels take PyTorch tensors as
raw pointers and run on PyTorch's current stream, so they order correctly with
PyTorch work and are captured by `torch.cuda.graph`.
"""
from __future__ import annotations

import functools
import logging
import pathlib
import threading
import time

import numpy as np
import torch

logger = logging.getLogger(__name__)
_DIR = pathlib.Path(__file__).resolve().parent
_LOCK = threading.Lock()

CTYPE = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


@functools.cache
def render_source(filename: str) -> str:
    """The source with `#include "common.cuh"` replaced by that file's text.

    Inlining keeps NVRTC free of include-path setup.
    """
    text = (_DIR / filename).read_text()
    common = (_DIR / "common.cuh").read_text().replace("#pragma once", "")
    return text.replace('#include "common.cuh"', common)


@functools.cache
def _module(filename: str, defines: tuple[tuple[str, object], ...], device: int):
    import cupy
    # CuPy picks the -arch for the device itself; we only add the constants.
    options = ("-std=c++17",) + tuple(f"-D{k}={v}" for k, v in defines)
    start = time.perf_counter()
    with cupy.cuda.Device(device):
        module = cupy.RawModule(code=render_source(filename), options=options)
        if hasattr(module, "compile"):  # compile now, not at the first launch
            module.compile()
    # A variant first needed mid-run stalls the step by this much (CuPy's disk cache makes it ms).
    logger.info("kernel %s %s ready in %.3f s", filename, dict(defines), time.perf_counter() - start)
    return module


def get_kernel(filename: str, name: str, device: torch.device, **defines: object):
    """The compiled kernel `name` of `filename` for these constants on `device`."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = tuple(sorted(defines.items()))
    with _LOCK:  # one compile per key even when threads race
        module = _module(filename, key, index)
        return _function(module, name)


@functools.cache
def _function(module, name: str):
    return module.get_function(name)


_STREAMS: dict[int, object] = {}


def _cupy_stream(device: int):
    """CuPy's view of PyTorch's current stream on `device`, cached per stream."""
    import cupy
    torch_stream = torch.cuda.current_stream(device)
    handle = torch_stream.cuda_stream
    stream = _STREAMS.get(handle)
    if stream is None:
        try:
            stream = cupy.cuda.Stream.from_external(torch_stream)
        except (AttributeError, TypeError):  # CuPy < 14 has only ExternalStream
            stream = cupy.cuda.ExternalStream(handle, device)
        _STREAMS[handle] = stream
    return stream


def launch(kernel, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, device: torch.device,
           shared_mem: int = 0) -> None:
    """Launch on PyTorch's current stream of `device` (captured by CUDA graphs)."""
    import cupy
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _cupy_stream(index)
    with cupy.cuda.Device(index), stream:
        kernel(grid, block, args, shared_mem=shared_mem)


# --- kernel argument packing: the numpy type must match the C parameter type ---

def ptr(t: torch.Tensor | None) -> np.uint64:
    return np.uint64(0 if t is None else t.data_ptr())


def i32(x: int) -> np.int32:
    return np.int32(x)


def i64(x: int) -> np.int64:
    return np.int64(x)


def f32(x: float) -> np.float32:
    return np.float32(x)


# --- argument checks: ValueError naming the argument and the rule ---

def check_cuda(name: str, t: torch.Tensor, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_cuda:
        raise ValueError(f"{name} must be on a CUDA device, got {t.device}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the other tensors are on {device}")


def check_dtype(name: str, t: torch.Tensor, *dtypes: torch.dtype) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_dim(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def check_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Exactly this shape and dense (the per-token and per-row vectors a kernel indexes flat)."""
    if tuple(t.shape) != tuple(shape) or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [{', '.join(map(str, shape))}] tensor, "
                         f"got shape {tuple(t.shape)}")


def check_rows(name: str, t: torch.Tensor) -> None:
    """Every dimension but the first dense (a row-strided view, like a slice of a fused QKV)."""
    if t.dim() >= 2 and not t[0].is_contiguous():
        raise ValueError(f"{name} must be dense past its first dimension, got strides {t.stride()}")


def aligned16(*tensors: torch.Tensor) -> bool:
    """True when each tensor's base address and row stride allow 16-byte accesses."""
    for t in tensors:
        if t.data_ptr() % 16 or (t.dim() > 1 and (t.stride(0) * t.element_size()) % 16):
            return False
    return True


def device_of(t: torch.Tensor) -> torch.device:
    return t.device if t.device.index is not None else torch.device("cuda", torch.cuda.current_device())


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    return _num_sms(device.index)
