"""`LoRARequest`: which adapter a request runs with (vLLM's name and fields). Pure Python.

An adapter is a PEFT folder (`adapter_config.json` + `adapter_model.safetensors`). `lora_int_id`
(>= 1) is its identity inside an engine: slots, caches and prefix-cache keys go by it, and two
requests with the same id must name the same adapter.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# Base-config fields that must agree for an adapter trained on another model to be refused.
_BASE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size")


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty str, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be an int >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path of adapter {self.lora_name!r} must be a non-empty folder path")

    def cache_salt(self) -> bytes:
        """What keys this adapter's prefix-cache blocks apart from the base model's and other adapters'."""
        return f"lora:{self.lora_int_id}:{self.lora_path}".encode()


@dataclass
class LoRAConfig:
    """`LLM(enable_lora=True, max_loras=, max_lora_rank=, max_cpu_loras=)`, vLLM's names and defaults.

    max_loras: adapters resident on the device at once (its slots; a step's requests use at most
    this many distinct adapters). max_cpu_loras: adapters kept parsed in host memory (an LRU
    cache that refills the slots without reading the disk); at least max_loras.
    """
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = max(self.max_loras, 8)
        elif self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


def read_adapter_config(path: str, name: str, max_lora_rank: int) -> dict:
    """The adapter's config, checked for what this engine runs (no model needed: the front calls it)."""
    if not os.path.isdir(path):
        raise ValueError(f"LoRA adapter {name!r}: lora_path {path!r} is not a local folder")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"LoRA adapter {name!r}: {path!r} has no {CONFIG_FILE} (not a PEFT adapter folder)")
    if not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        raise ValueError(f"LoRA adapter {name!r}: {path!r} has no {WEIGHTS_FILE} (only safetensors is read)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"LoRA adapter {name!r}: cannot read {config_path}: {exc}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {name!r}: peft_type is {config.get('peft_type')!r}, only 'LORA' is served")
    r = config.get("r")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA adapter {name!r}: r must be an int >= 1, got {r!r}")
    if r > max_lora_rank:
        raise ValueError(f"LoRA adapter {name!r}: rank r={r} is above max_lora_rank={max_lora_rank}")
    unsupported = {"use_dora": bool(config.get("use_dora")), "bias": config.get("bias", "none") != "none",
                   "modules_to_save": bool(config.get("modules_to_save")),
                   "rank_pattern": bool(config.get("rank_pattern")), "alpha_pattern": bool(config.get("alpha_pattern")),
                   "fan_in_fan_out": bool(config.get("fan_in_fan_out"))}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"LoRA adapter {name!r}: {', '.join(f'{k}={config.get(k)!r}' for k in bad)} "
                         "is not supported")
    return config


def check_base_model(config: dict, hf_config, name: str) -> None:
    """ValueError when the adapter's base checkpoint is a local folder whose config differs from ours."""
    base = config.get("base_model_name_or_path")
    base_config = os.path.join(base, "config.json") if isinstance(base, str) and base else ""
    if not base_config or not os.path.isfile(base_config):
        return   # a hub name or a moved folder: the tensors' shapes are checked instead
    with open(base_config) as f:
        theirs = json.load(f)
    for field in _BASE_FIELDS:
        ours = getattr(hf_config, field, None)
        if field in theirs and ours is not None and theirs[field] != ours:
            raise ValueError(f"LoRA adapter {name!r} was trained on another base model ({base}): its "
                             f"{field}={theirs[field]!r}, the served model's is {ours!r}")


__all__ = ["LoRAConfig", "LoRARequest", "read_adapter_config", "check_base_model"]
