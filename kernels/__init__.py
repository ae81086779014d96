"""Kernels: CUDA sources with CuPy launchers, and a PyTorch reference for each."""
if __name__ != "pagedray.kernels":  # found as a bare `kernels` from the repository root
    from pagedray.kernels.import_guard import step_aside
    step_aside(__name__, __path__)
import functools
import logging

logger = logging.getLogger(__name__)

# KV-cache block sizes the CUDA decode kernel (and so the decode CUDA graphs) is compiled for.
CUDA_BLOCK_SIZES = (8, 16, 32)


def install_hint() -> str:
    """The pip command that installs the GPU kernels' packages for this torch's CUDA build."""
    import torch
    major = (torch.version.cuda or "13").split(".")[0]
    extra = f"cuda{major}" if major in ("12", "13") else "cuda13"
    return f'pip install -e ".[{extra}]" (torch is built for CUDA {torch.version.cuda})'


@functools.cache
def cuda_available() -> bool:
    """True when CuPy and a CUDA device are usable (the CUDA kernels are then used).

    On a CUDA machine without CuPy this warns once: every kernel falls back to its PyTorch
    reference and decode CUDA graphs are off."""
    import torch
    if not torch.cuda.is_available():
        return False
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        logger.warning("CuPy is not installed (%s): the CUDA kernels (paged attention, KV-cache writes, "
                       "norms, rotary) run as slower PyTorch references and decode CUDA graphs are off; "
                       "install it with %s", exc, install_hint())
        return False
    return True


def kernel_status() -> str:
    """One line: which GPU kernel packages are usable here."""
    from pagedray.kernels.ops import triton_prefill
    cupy = "CuPy kernels on" if cuda_available() else "CuPy missing: PyTorch references"
    triton = "Triton prefill on" if triton_prefill() is not None else "Triton missing: reference prefill"
    return f"{cupy}; {triton}"
