"""Which quantization a checkpoint asks for, read from config.json's `quantization_config`.

Supported (vLLM's names):
- `quant_method: "compressed-tensors"` with `format: "float-quantized"` (llm-compressor's FP8):
  8-bit float weights per channel or per tensor (`weight_scale`), activations dynamic per token
  or static per tensor (`input_scale`), an `ignore` list of layer names or `re:` patterns.
- `quant_method: "fp8"` (HF / DeepSeek / Qwen FP8): block-wise with `weight_block_size` and
  `weight_scale_inv`, or per tensor (`weight_scale`) without it.
- `quantization="fp8"` on a 16/32-bit checkpoint: weights quantized per output channel at load,
  activations dynamic per token.
Anything else (GPTQ, AWQ, bitsandbytes, an unknown method or scheme) is a ValueError naming it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

QUANTIZATION_METHODS = (None, "fp8")
SUPPORTED_CHECKPOINTS = ("compressed-tensors (format float-quantized, FP8 e4m3)",
                         "fp8 (block-wise weight_block_size + weight_scale_inv, or per-tensor weight_scale)")


def _supported() -> str:
    return "; ".join(SUPPORTED_CHECKPOINTS) + "; or quantization='fp8' on a bf16/fp16/fp32 checkpoint"


@dataclass(frozen=True)
class Fp8Config:
    """How every quantized linear layer of one model stores and computes.

    weight_strategy: "channel" (one scale per output row), "tensor" (one per checkpoint tensor),
    "block" (one per weight_block_size tile); dynamic: activations quantized per token at run
    time (else a static per-tensor input_scale from the checkpoint); from_checkpoint: the weights
    are FP8 on disk (else quantized at load from 16/32-bit); ignore: layers left unquantized.
    """
    weight_strategy: str
    dynamic: bool = True
    from_checkpoint: bool = True
    block_size: tuple[int, int] | None = None
    scale_name: str = "weight_scale"
    ignore: tuple[str, ...] = field(default_factory=tuple)
    kv_cache_scales: bool = False   # the checkpoint holds k_scale / v_scale for an FP8 KV cache
    method: str = "fp8"

    def is_ignored(self, checkpoint_names: list[str]) -> bool:
        """Whether a layer (its checkpoint names; a fused layer has several) stays unquantized."""
        hits = [any(_matches(rule, name) for rule in self.ignore) for name in checkpoint_names]
        if any(hits) and not all(hits):
            raise ValueError(f"the quantization ignore list names only some of the layers fused together: "
                             f"{[n for n, h in zip(checkpoint_names, hits) if h]} of {checkpoint_names}; "
                             f"they must be quantized alike")
        return all(hits)


def _matches(rule: str, name: str) -> bool:
    if rule.startswith("re:"):
        return re.match(rule[3:], name) is not None
    return name == rule or name.endswith("." + rule) and "." not in rule


def get_quant_config(hf_config: Any, quantization: str | None) -> Fp8Config | None:
    """The model's quantization, from `quantization` and the checkpoint's `quantization_config`."""
    if quantization not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got {quantization!r}")
    qc = getattr(hf_config, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    if not qc:
        return Fp8Config("channel", dynamic=True, from_checkpoint=False) if quantization == "fp8" else None
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "fp8":
        return _hf_fp8(qc)
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported (supported: {_supported()})")


def _compressed_tensors(qc: dict) -> Fp8Config:
    fmt = qc.get("format")
    if fmt not in ("float-quantized", "naive-quantized"):
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (supported: 'float-quantized', "
                         f"FP8 e4m3 weights)")
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors config_groups must hold exactly one scheme, got {len(groups)}")
    scheme = next(iter(groups.values()))
    targets = scheme.get("targets") or []
    if targets != ["Linear"]:
        raise ValueError(f"compressed-tensors targets must be ['Linear'], got {targets}")
    w, a = scheme.get("weights") or {}, scheme.get("input_activations")
    _check_fp8_args("weights", w)
    strategy = w.get("strategy")
    if strategy not in ("channel", "tensor"):
        raise ValueError(f"compressed-tensors weights.strategy {strategy!r} is not supported "
                         f"(supported: 'channel', 'tensor')")
    if a is None:
        raise ValueError("compressed-tensors schemes without input_activations (weight-only FP8) are not "
                         "supported; supported: FP8 weights with dynamic per-token or static per-tensor activations")
    _check_fp8_args("input_activations", a)
    dynamic = bool(a.get("dynamic"))
    want = "token" if dynamic else "tensor"
    if a.get("strategy") != want:
        raise ValueError(f"compressed-tensors input_activations.strategy must be {want!r} with "
                         f"dynamic={dynamic}, got {a.get('strategy')!r}")
    return Fp8Config(strategy, dynamic=dynamic, ignore=tuple(qc.get("ignore") or ()),
                     kv_cache_scales=_kv_scheme(qc.get("kv_cache_scheme")), method="compressed-tensors")


def _check_fp8_args(what: str, args: dict) -> None:
    if args.get("num_bits") != 8 or args.get("type") != "float" or args.get("symmetric") is False:
        raise ValueError(f"compressed-tensors {what} must be symmetric 8-bit float (FP8), got "
                         f"num_bits={args.get('num_bits')}, type={args.get('type')!r}, "
                         f"symmetric={args.get('symmetric')} (supported: {_supported()})")


def _kv_scheme(kv: dict | None) -> bool:
    if not kv:
        return False
    if kv.get("num_bits") != 8 or kv.get("type") != "float" or kv.get("strategy") != "tensor":
        raise ValueError(f"kv_cache_scheme must be 8-bit float per tensor, got {kv}")
    return True


def _hf_fp8(qc: dict) -> Fp8Config:
    fmt = qc.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"fp8 quantization_config.fmt must be 'e4m3', got {fmt!r}")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"fp8 activation_scheme must be 'dynamic' or 'static', got {scheme!r}")
    ignore = tuple(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ())
    block = qc.get("weight_block_size")
    if block is None:
        return Fp8Config("tensor", dynamic=scheme == "dynamic", ignore=ignore)
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 and b % 16 == 0 for b in block)):
        raise ValueError(f"weight_block_size must be two positive multiples of 16, got {block!r}")
    if scheme != "dynamic":
        raise ValueError("block-wise fp8 (weight_block_size) needs activation_scheme 'dynamic', got 'static'")
    return Fp8Config("block", dynamic=True, block_size=tuple(block), scale_name="weight_scale_inv", ignore=ignore)
