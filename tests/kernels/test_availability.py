"""On a CUDA machine a missing CuPy or Triton is one warning naming what is slower and the install
command; other failures are not swallowed."""
from __future__ import annotations

import logging
import sys

import pytest
import torch

import pagedray.kernels as kernels
from pagedray.kernels import ops


@pytest.fixture
def fresh(monkeypatch):
    """A CUDA machine as far as the checks can tell, with their caches emptied around the test."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kernels.cuda_available.cache_clear()
    ops.triton_prefill.cache_clear()
    yield monkeypatch
    kernels.cuda_available.cache_clear()
    ops.triton_prefill.cache_clear()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_missing_cupy_warns_once_with_the_install_command(fresh, caplog):
    fresh.setitem(sys.modules, "cupy", None)   # `import cupy` raises ImportError
    fresh.setattr(torch.version, "cuda", "12.8")
    with caplog.at_level(logging.WARNING, logger="pagedray.kernels"):
        assert kernels.cuda_available() is False
        assert kernels.cuda_available() is False
    [message] = _warnings(caplog)
    assert "CuPy is not installed" in message and "slower PyTorch references" in message
    assert "decode CUDA graphs are off" in message and 'pip install -e ".[cuda12]"' in message


def test_install_hint_follows_torch_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert '".[cuda13]"' in kernels.install_hint()


def test_a_broken_cupy_is_not_swallowed(fresh):
    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "cupy":
                raise RuntimeError("CUDA driver version is insufficient")
            return None

    fresh.delitem(sys.modules, "cupy", raising=False)
    fresh.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(RuntimeError, match="driver version"):
        kernels.cuda_available()


def test_missing_triton_warns_once(fresh, caplog):
    fresh.setitem(sys.modules, "pagedray.kernels.prefill_triton", None)
    # Where Triton is installed an earlier test imported the module, and `from pagedray.kernels import
    # prefill_triton` then finds the package's attribute before it looks at sys.modules.
    fresh.delattr(kernels, "prefill_triton", raising=False)
    with caplog.at_level(logging.WARNING, logger="pagedray.kernels"):
        assert ops.triton_prefill() is None
        assert ops.triton_prefill() is None
    [message] = _warnings(caplog)
    assert "Triton is not installed" in message and "slower PyTorch reference attention" in message
    assert "pip install triton" in message


def test_no_cuda_device_no_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kernels.cuda_available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="pagedray.kernels"):
            assert kernels.cuda_available() is False
    finally:
        kernels.cuda_available.cache_clear()
    assert _warnings(caplog) == []
