"""Model classes keyed by the HF `architectures` names in config.json.

In-tree models are registered lazily ("module:Class") so importing the
registry does not import every model file; out-of-tree code registers a class
directly with `ModelRegistry.register_model(arch, cls)`.
"""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

# arch -> "pagedray.models.<module>:<Class>"
_IN_TREE: dict[str, str] = {
    "LlamaForCausalLM": "pagedray.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "pagedray.models.mistral:MistralForCausalLM",
    "Qwen2ForCausalLM": "pagedray.models.qwen2:Qwen2ForCausalLM",
    "Qwen3ForCausalLM": "pagedray.models.qwen3:Qwen3ForCausalLM",
    "GemmaForCausalLM": "pagedray.models.gemma:GemmaForCausalLM",
    "Phi3ForCausalLM": "pagedray.models.phi3:Phi3ForCausalLM",
    "MixtralForCausalLM": "pagedray.models.mixtral:MixtralForCausalLM",
    "OPTForCausalLM": "pagedray.models.opt:OPTForCausalLM",
    "GPT2LMHeadModel": "pagedray.models.gpt2:GPT2LMHeadModel",
    "GPTNeoXForCausalLM": "pagedray.models.gpt_neox:GPTNeoXForCausalLM",
}


class _ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, type[nn.Module] | str] = dict(_IN_TREE)
        self._user: set[str] = set()   # archs registered by user code

    def register_model(self, arch: str, cls: type[nn.Module] | str) -> None:
        """Map an HF architecture name to a model class (or a lazy "module:Class" path)."""
        self._models[arch] = cls
        self._user.add(arch)

    def out_of_tree(self) -> dict[str, type[nn.Module] | str]:
        """What user code registered in this process. Ray actors start with only the in-tree
        entries, so executors hand them this (the classes travel by cloudpickle: by reference
        when their module is importable on the node, by value when defined in `__main__`)."""
        return {arch: self._models[arch] for arch in sorted(self._user)}

    def register_all(self, entries: dict[str, type[nn.Module] | str]) -> None:
        for arch, cls in entries.items():
            self.register_model(arch, cls)

    def get_supported_archs(self) -> list[str]:
        return sorted(self._models)

    def _load(self, arch: str) -> type[nn.Module]:
        entry = self._models[arch]
        if isinstance(entry, str):
            module, _, name = entry.partition(":")
            entry = getattr(importlib.import_module(module), name)
            self._models[arch] = entry
        return entry

    def resolve(self, architectures: list[str] | None) -> type[nn.Module]:
        """The class of the first supported name in `architectures`."""
        for arch in architectures or []:
            if arch in self._models:
                return self._load(arch)
        raise ValueError(f"model architectures {list(architectures or [])} are not supported; "
                         f"supported architectures: {self.get_supported_archs()}")


ModelRegistry = _ModelRegistry()


def _first_attr(cfg: Any, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    raise ValueError(f"the model config has none of {names}")


def get_kv_cache_spec(hf_config: Any, tp_size: int) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads_per_rank, head_size) of the paged KV cache on each rank.

    A model class may override this with a `get_kv_cache_spec(hf_config, tp_size)`
    classmethod; the generic rule reads the usual HF field names, honours an
    explicit `head_dim`, and replicates KV heads when there are fewer than ranks
    (as QKVParallelLinear does).
    """
    cls = ModelRegistry.resolve(getattr(hf_config, "architectures", None))
    custom = getattr(cls, "get_kv_cache_spec", None)
    if custom is not None:
        return custom(hf_config, tp_size)
    num_layers = _first_attr(hf_config, ("num_hidden_layers", "n_layer", "num_layers"))
    num_heads = _first_attr(hf_config, ("num_attention_heads", "n_head"))
    num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
    head_size = getattr(hf_config, "head_dim", None) or _first_attr(hf_config, ("hidden_size", "n_embd")) // num_heads
    if num_heads % tp_size:
        raise ValueError(f"num_attention_heads ({num_heads}) must be divisible by the tensor-parallel size "
                         f"({tp_size})")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"num_key_value_heads ({num_kv_heads}) must be divisible by the tensor-parallel "
                             f"size ({tp_size})")
        return num_layers, num_kv_heads // tp_size, head_size
    if tp_size % num_kv_heads:
        raise ValueError(f"the tensor-parallel size ({tp_size}) must be a multiple of num_key_value_heads "
                         f"({num_kv_heads}) when it is larger")
    return num_layers, 1, head_size
