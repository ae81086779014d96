"""Builds a registered model and fills its weights (safetensors or dummy), strictly."""
from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any, Iterator

import torch
from torch import nn

from pagedray.kernels.fp8 import check_fp8_supported
from pagedray.models.layers import quantization as quantization_
from pagedray.models.layers import rotary
from pagedray.models.layers.quantization import get_quant_config
from pagedray.models.layers.layernorm import RMSNorm
from pagedray.models.registry import ModelRegistry
from pagedray.models.utils import checkpoint_name, packed_module_of

LOAD_FORMATS = ("auto", "safetensors", "dummy")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def safetensors_files(model_path: str) -> list[str]:
    """The checkpoint files: those named by model.safetensors.index.json, else every *.safetensors."""
    if not os.path.isdir(model_path):
        raise ValueError(f"model path {model_path!r} is not a local directory (nothing is downloaded)")
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return [os.path.join(model_path, name) for name in sorted(set(weight_map.values()))]
    files = sorted(glob.glob(os.path.join(model_path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors checkpoint in {model_path!r} (only safetensors is supported)")
    return files


def iterate_safetensors(model_path: str) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) pairs; a slice is only read when a weight_loader indexes it."""
    from safetensors import safe_open
    for path in safetensors_files(model_path):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int, low: float = -1e-2, high: float = 1e-2) -> None:
    """Seeded small uniform weights; norms get their identity scale so activations keep their size."""
    gen = {}
    for module in model.modules():
        is_norm = isinstance(module, (RMSNorm, nn.LayerNorm))
        for name, param in module.named_parameters(recurse=False):
            if param.dtype == torch.float8_e4m3fn:
                continue  # quantized layers fill their own (quantization.init_dummy)
            if is_norm:
                identity = 1.0 if name == "weight" and not getattr(module, "unit_offset", False) else 0.0
                param.fill_(identity)
                continue
            if param.device not in gen:
                gen[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.uniform_(low, high, generator=gen[param.device])


def _check_complete(model: nn.Module, loaded: set[str]) -> None:
    """Every parameter must have come from the checkpoint; name the missing ones as the checkpoint would."""
    missing = sorted(set(dict(model.named_parameters())) - set(loaded))
    if not missing:
        return
    mapping = getattr(model, "packed_modules_mapping", {})
    names = []
    for name in missing:
        packed = packed_module_of(name, mapping)
        names += [checkpoint_name(name, packed, m) for m, _ in mapping[packed]] if packed else [name]
    raise ValueError(f"the checkpoint is missing {len(names)} weight(s) of {type(model).__name__}: {names}")


def get_model(hf_config: Any, model_path: str, dtype: torch.dtype, device: torch.device | str,
              load_format: str = "auto", seed: int = 0, quantization: str | None = None) -> nn.Module:
    """Build the registered class for `hf_config` on `device` in `dtype` and fill its weights.

    Tensor-parallel sharding follows the default process group when one is
    initialised. Raises ValueError for an unknown architecture or load format,
    a missing, unexpected or mis-shaped checkpoint tensor, and an unsupported quantization.
    `quantization` ("fp8" or None) quantizes a 16/32-bit checkpoint at load; a quantized checkpoint
    is recognised from its config's quantization_config either way.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    quant_config = get_quant_config(hf_config, quantization)
    if quant_config is not None:
        check_fp8_supported(torch.device(device))
    cls = ModelRegistry.resolve(getattr(hf_config, "architectures", None))
    rotary._ROPE_CACHE.clear()  # share cos/sin caches within this model only
    with _default_dtype(dtype), torch.device(device):
        model = cls(hf_config)
        if quant_config is not None:
            quantization_.quantize_model(model, quant_config)
            if quant_config.kv_cache_scales:
                quantization_.add_kv_cache_scales(model)
    rotary._ROPE_CACHE.clear()
    if load_format == "dummy":
        init_dummy_weights(model, seed)
        quantization_.init_dummy(model, seed)
    else:
        weights = iterate_safetensors(model_path)
        if quant_config is not None and quant_config.kv_cache_scales:
            weights = quantization_.remap_kv_scale_names(weights)
        _check_complete(model, model.load_weights(weights))
    quantization_.process_weights_after_loading(model)
    return model.eval()
