"""Reads a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) for a built
model whose layers `apply_lora` wrapped, into per-layer slot contents for this rank.

Checked, each a ValueError naming what is wrong: the folder and its files, `peft_type`, a rank
above max_lora_rank, features we do not run (DoRA, trained biases, modules_to_save, per-module
rank/alpha patterns), a target module the model has no LoRA layer for (embeddings, the LM head,
a layer index past the model's), and a base-model mismatch: the base checkpoint's config when it
is a local folder, and every tensor's shape against the layer it targets.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch

from pagedray.common.lora import WEIGHTS_FILE, check_base_model, read_adapter_config
from pagedray.models.layers.lora import LoRALinear
from pagedray.models.layers.pipeline import PPMissing

# Keys of a saved PEFT LoRA: base_model.model.<module>.lora_{A,B}[.<adapter name>].weight
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoRAWeights:
    """One adapter, parsed for this rank: {module name: (A stack row, B stack row)} for its slot."""
    name: str
    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]


def on_other_stage(model: torch.nn.Module | None, module: str) -> bool:
    """Whether `module` lies under a layer this pipeline stage does not hold (a PPMissing placeholder)."""
    sub = model
    for part in module.split("."):
        if sub is None:
            return False
        if isinstance(sub, PPMissing):
            return True
        if part.isdigit() and isinstance(sub, torch.nn.ModuleList):
            sub = sub[int(part)] if int(part) < len(sub) else None
        else:
            sub = getattr(sub, part, None)
    return isinstance(sub, PPMissing)


def load_lora_weights(path: str, name: str, layers: dict[str, LoRALinear], hf_config, max_lora_rank: int,
                      dtype: torch.dtype, model: torch.nn.Module | None = None) -> LoRAWeights:
    """`model`: the stage's model under pipeline parallelism, whose other stages' layers are skipped."""
    from safetensors.torch import load_file
    config = read_adapter_config(path, name, max_lora_rank)
    check_base_model(config, hf_config, name)
    groups = {gname: (layer_name, g) for layer_name, layer in layers.items()
              for g, (gname, _) in enumerate(layer.groups)}
    supported = sorted({gname.rsplit(".", 1)[-1] for gname in groups})
    targets = config.get("target_modules")
    if isinstance(targets, list):
        missing = [t for t in targets if t.rsplit(".", 1)[-1] not in supported]
        if missing:
            raise ValueError(f"LoRA adapter {name!r} targets {missing}, which the model has no LoRA layer for "
                             f"(supported: {supported})")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(os.path.join(path, WEIGHTS_FILE)).items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A/B weight (not supported)")
        if m["module"] not in groups:
            if on_other_stage(model, m["module"]):
                continue   # another pipeline stage's layer: that stage loads it
            raise ValueError(f"LoRA adapter {name!r} targets module {m['module']!r}, which the model has no "
                             f"LoRA layer for (supported: {supported})")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    alpha = config.get("lora_alpha", config["r"])
    per_layer: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {name!r}: module {module!r} has lora_{set(ab).pop()} without its pair")
        layer_name, g = groups[module]
        layer = layers[layer_name]
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        want_a = (r, layer.base.input_size)
        want_b = (layer.full_b_rows(layer.groups[g][1]), r)
        if r > max_lora_rank:
            raise ValueError(f"LoRA adapter {name!r}: {module} has rank {r}, above max_lora_rank={max_lora_rank}")
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(f"LoRA adapter {name!r} does not fit the served base model: {module} has lora_A "
                             f"{tuple(a.shape)} and lora_B {tuple(b.shape)}, the model needs {want_a} and {want_b}")
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        per_layer.setdefault(layer_name, {})[g] = (a.to(dtype), (b.float() * scale).to(dtype))
    return LoRAWeights(name, config["r"], {ln: layers[ln].build(parts) for ln, parts in per_layer.items()})


__all__ = ["LoRAWeights", "load_lora_weights"]
