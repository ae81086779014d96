"""FP8 (e4m3) linear products: the PyTorch references and the dispatch the quantized layers call.

A quantized weight is W ≈ Wq · s with Wq float8_e4m3fn [N, K] and s float32 either per output row
([N], per-channel; a per-tensor scale is stored expanded to its rows) or per (row, k-block)
([N, ceil(K / block_k)], the block-wise format with its row blocks expanded to rows).

- `fp8_weight_only_ref`: the CPU path and the skinny GEMM's oracle: dequantize the weight, then
  matmul in float32 with x as it is. A quantized checkpoint then computes exactly its dequantized
  model (what the CPU tests compare with HF transformers).
- `fp8_linear_ref`: the oracle of the W8A8 product: quantize x per token (or with a static input
  scale), dequantize both sides, matmul in float32 — what the FP8 tensor-core product computes up
  to summation order.
- `fp8_linear`: on a CUDA device with FP8 tensor cores, decode's few tokens run the FP8-weight
  skinny GEMM (kernels/gemv_fp8.cu: weight-only, x stays 16-bit); more tokens run the fused
  per-token quantization (kernels/fp8_quant.cu) then cuBLASLt through `torch._scaled_mm` with
  row-wise scales (W8A8: the tensor cores' FP8 rate). Elsewhere `fp8_weight_only_ref` runs.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from pagedray.kernels import cuda_available, options

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0          # largest finite e4m3fn value
MIN_SCALE = 1e-10        # an all-zero row still gets a finite, positive scale


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def has_fp8_tensor_cores(device: torch.device | int | None = None) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) and later (Hopper 9.0)."""
    if not torch.cuda.is_available():
        return False
    index = device if isinstance(device, int) else getattr(device, "index", None)
    return _capability(torch.cuda.current_device() if index is None else index) >= (8, 9)


def check_fp8_supported(device: torch.device) -> None:
    """Clear error where FP8 cannot run on this CUDA device (CPU always runs the reference)."""
    if device.type == "cuda" and not has_fp8_tensor_cores(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f"FP8 needs a GPU with FP8 tensor cores (compute capability >= 8.9, e.g. L4, H100, "
                         f"H200); {torch.cuda.get_device_name(device)} is sm_{major}{minor}")


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Round to e4m3 (nearest even), saturating at ±448 like the hardware's satfinite conversion."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] e4m3, scale [M, 1] float32) with x ≈ xq · scale, scale = amax / 448."""
    xf = x.float()
    # A tensor divisor, not the Python float: PyTorch's CUDA division by a host scalar multiplies by
    # its rounded reciprocal, one ulp off IEEE amax / 448 (what the CUDA kernel computes) for some rows.
    fp8_max = torch.full((), FP8_MAX, dtype=torch.float32, device=x.device)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / fp8_max).clamp(min=MIN_SCALE)
    return to_fp8(xf / scale), scale


def quantize_static_ref(x: torch.Tensor, input_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] with a calibrated per-tensor scale -> (xq, scale [M, 1])."""
    scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    return to_fp8(x.float() / scale), scale


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16/32-bit weight [N, K] -> (Wq [N, K] e4m3, scale [N] float32): what quantization="fp8" does."""
    wq, scale = quantize_per_token_ref(weight)
    return wq, scale.view(-1)


def dequantize(wq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Wq [N, K] e4m3 with scale [N] or [N, Kb] (k-blocks of ceil(K / Kb) columns) -> float32 [N, K]."""
    w = wq.float()
    if scale.dim() == 1:
        return w * scale.float()[:, None]
    k = w.shape[1]
    block_k = -(-k // scale.shape[1])
    return w * scale.float().repeat_interleave(block_k, dim=1)[:, :k]


def fp8_linear_ref(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                   input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = dequant(quant(x)) · dequant(Wq)^T (+ bias) in float32, returned in x's dtype."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xq, xs = quantize_per_token_ref(x2) if input_scale is None else quantize_static_ref(x2, input_scale)
    y = F.linear(xq.float() * xs, dequantize(wq, scale), None if bias is None else bias.float())
    return y.to(x.dtype).view(*x.shape[:-1], wq.shape[0])


def fp8_weight_only_ref(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """x · dequant(Wq)^T (+ bias) in float32 with x unquantized: the FP8-weight skinny GEMM's oracle."""
    y = F.linear(x.float(), dequantize(wq, scale), None if bias is None else bias.float())
    return y.to(x.dtype)  # F.linear keeps x's leading dimensions


def _cuda_fits(x: torch.Tensor, wq: torch.Tensor) -> bool:
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and wq.dtype == FP8_DTYPE
            and x.shape[-1] % 16 == 0 and wq.shape[0] % 16 == 0 and cuda_available())


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
               input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized product of x [..., K] and Wq [N, K]: CUDA kernels where they fit, else the reference."""
    if not _cuda_fits(x, wq):
        return fp8_weight_only_ref(x, wq, scale, bias)
    from pagedray.kernels import fp8_cuda
    k, n = x.shape[-1], wq.shape[0]
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m <= options.current().fp8_skinny_gemm_max_m:
        y = fp8_cuda.skinny_gemm_fp8(x2, wq, scale, bias)
    elif scale.dim() == 2:
        # Block scales have no cuBLASLt row-wise form: dequantize to x's dtype (correct, not fast).
        y = F.linear(x2, dequantize(wq, scale).to(x.dtype), bias)
    else:
        y = fp8_cuda.scaled_mm(x2, wq, scale, bias, input_scale)
    return y.view(*x.shape[:-1], n)


__all__ = ["FP8_DTYPE", "FP8_MAX", "has_fp8_tensor_cores", "check_fp8_supported", "to_fp8",
           "quantize_per_token_ref", "quantize_static_ref", "quantize_weight_per_channel", "dequantize",
           "fp8_linear_ref", "fp8_weight_only_ref", "fp8_linear"]
