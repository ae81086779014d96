"""Quantized checkpoints and on-the-fly quantization (FP8), applied to a built model by the loader.

`quantize_model` gives each linear layer that the config does not ignore an `Fp8LinearMethod`
(its FP8 weight and scales replace the 16-bit weight); `LinearBase` runs `layer.quant_method.apply`
when a layer has one. Model files do not change.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from pagedray.models.layers.attention import Attention
from pagedray.models.layers.linear import LinearBase
from pagedray.models.layers.quantization.config import (QUANTIZATION_METHODS, SUPPORTED_CHECKPOINTS, Fp8Config,
                                                        get_quant_config)
from pagedray.models.layers.quantization.fp8 import Fp8LinearMethod
from pagedray.models.layers.weights import materialize, set_weight_loader


def _checkpoint_names(name: str, mapping: dict) -> list[str]:
    """The checkpoint names of one layer: its members' for a fused layer (qkv_proj -> q/k/v_proj)."""
    prefix, _, last = name.rpartition(".")
    if last not in mapping:
        return [name]
    return [f"{prefix}.{member}" if prefix else member for member, _ in mapping[last]]


def quantize_model(model: nn.Module, config: Fp8Config) -> int:
    """Swap FP8 parameters into every linear layer not ignored; returns how many layers were quantized."""
    mapping = getattr(model, "packed_modules_mapping", {})
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and not config.is_ignored(_checkpoint_names(name, mapping)):
            module.quant_method = Fp8LinearMethod(config)
            module.quant_method.create_weights(module)
            count += 1
    if count == 0:
        raise ValueError(f"quantization {config.method!r}: every linear layer of {type(model).__name__} is on "
                         f"the ignore list, or the model has none that can be quantized")
    return count


def add_kv_cache_scales(model: nn.Module) -> None:
    """Parameters for the checkpoint's per-tensor k_scale / v_scale on every attention layer."""
    for module in model.modules():
        if isinstance(module, Attention):
            for name in ("k_scale", "v_scale"):
                param = nn.Parameter(torch.ones((), device=_device_of(model)), requires_grad=False)
                module.register_parameter(name, set_weight_loader(param, _load_one_value))


def _load_one_value(param: nn.Parameter, loaded: Any, shard_id: Any = None) -> None:
    t = materialize(loaded).float()
    if t.numel() != 1 or shard_id is not None:
        raise ValueError(f"a KV-cache scale must hold one (per-tensor) value, got shape {tuple(t.shape)}")
    param.data.copy_(t.reshape(()))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def remap_kv_scale_names(weights: Iterator[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """Checkpoint names of the KV-cache scales onto the attention layer's: llm-compressor writes
    `self_attn.k_proj.output_scale` (older versions `self_attn.k_scale`); ours is `self_attn.attn.k_scale`."""
    for name, tensor in weights:
        for old, new in ((".k_proj.output_scale", ".attn.k_scale"), (".v_proj.output_scale", ".attn.v_scale"),
                         ("self_attn.k_scale", "self_attn.attn.k_scale"),
                         ("self_attn.v_scale", "self_attn.attn.v_scale")):
            if name.endswith(old):
                name = name[:-len(old)] + new
                break
        yield name, tensor


def _quantized(model: nn.Module):
    return [m for m in model.modules() if getattr(m, "quant_method", None) is not None]


def process_weights_after_loading(model: nn.Module) -> None:
    for module in _quantized(model):
        module.quant_method.process_weights_after_loading(module)
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(getattr(module, "k_scale", None), nn.Parameter):
            # Read once here: a float per forward costs no device sync.
            module.kv_scales = (float(module.k_scale.reshape(-1)[0]), float(module.v_scale.reshape(-1)[0]))


def init_dummy(model: nn.Module, seed: int) -> None:
    gens: dict[torch.device, torch.Generator] = {}
    for module in _quantized(model):
        dev = module.weight.device
        gen = gens.setdefault(dev, torch.Generator(device=dev).manual_seed(seed + 1))
        module.quant_method.init_dummy(module, gen)
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(getattr(module, "k_scale", None), nn.Parameter):
            module.k_scale.fill_(1.0)
            module.v_scale.fill_(1.0)


__all__ = ["QUANTIZATION_METHODS", "SUPPORTED_CHECKPOINTS", "Fp8Config", "Fp8LinearMethod", "get_quant_config",
           "quantize_model", "add_kv_cache_scales", "remap_kv_scale_names", "process_weights_after_loading",
           "init_dummy"]
