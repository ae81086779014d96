"""Kernel launches with programmatic dependent launch, through the CUDA driver's cuLaunchKernelEx.

CuPy's launch takes no launch attributes, so this calls the driver directly (ctypes over
libcuda, which every CUDA process has loaded). The attribute lets the GPU start a kernel while
the previous kernel in the stream still runs (each of our kernels waits for it before reading
its outputs: common.cuh, pdl_enter); stream capture records it as a programmatic edge of the
CUDA graph. Any driver error turns the feature off for the process, with one warning, and the
launch falls back to CuPy's.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import struct

import numpy as np
import torch

logger = logging.getLogger(__name__)

_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_failed = False


class _AttrValue(ctypes.Union):
    _fields_ = [("pad", ctypes.c_char * 64), ("allowed", ctypes.c_int)]


class _Attr(ctypes.Structure):  # CUlaunchAttribute: id, padding to 8 bytes, a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attr)), ("num_attrs", ctypes.c_uint)]


_FORMAT = {np.uint64: "Q", np.int64: "q", np.int32: "i", np.float32: "f"}  # the launch packers' types


@functools.cache
def _layout(types: tuple[type, ...]) -> tuple[str, tuple[int, ...]]:
    """struct format of the arguments laid out as C would, and each one's byte offset."""
    codes = "".join(_FORMAT[t] for t in types)
    offsets = tuple(struct.calcsize("@" + codes[:i + 1]) - struct.calcsize(codes[i]) for i in range(len(codes)))
    return "@" + codes, offsets


@functools.cache
def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuLaunchKernelEx
    fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    fn.restype = ctypes.c_int
    attr = _Attr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value.allowed = 1
    return fn, attr


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def usable(index: int) -> bool:
    return not _failed and _capable(index)


def _pad3(dims: tuple[int, ...]) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in dims) + (1, 1, 1)
    return dims[0], dims[1], dims[2]


def launch(function_ptr: int, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, stream: int,
           shared_mem: int = 0) -> bool:
    """Launch with the PDL attribute; False (and PDL off from now on) where the driver refuses."""
    global _failed
    try:
        fn, attr = _driver()
        fmt, offsets = _layout(tuple(map(type, args)))
    except (OSError, AttributeError, KeyError) as exc:
        _failed = True
        logger.warning("programmatic dependent launch unavailable (%r): plain launches from now on", exc)
        return False
    values = ctypes.create_string_buffer(struct.pack(fmt, *[a.item() for a in args]), max(1, struct.calcsize(fmt)))
    base = ctypes.addressof(values)
    params = (ctypes.c_void_p * max(1, len(offsets)))(*[base + off for off in offsets])
    config = _Config(*_pad3(grid), *_pad3(block), shared_mem, stream, ctypes.pointer(attr), 1)
    err = fn(ctypes.byref(config), function_ptr, params, None)
    if err:
        _failed = True
        logger.warning("cuLaunchKernelEx failed with CUresult %d: plain launches from now on", err)
        return False
    return True
