"""The served LoRA adapters by name, shared by every entry point of one frontend. Pure Python.

`--lora-modules name=path` and `POST /v1/load_lora_adapter` add one (its config checked here:
files, rank, supported features; the tensors against the model when a core first runs it);
OpenAI's `model` and gRPC's adapter field pick one by name. Each gets its own `lora_int_id`,
never reused, so an adapter loaded again under an old name is never confused with the old one
in a core's caches. Unloading stops new requests from naming it; running ones finish with it.
"""
from __future__ import annotations

import itertools

from pagedray.common.lora import LoRARequest, read_adapter_config


class LoRARegistry:
    """`max_lora_rank` is the engines' (0: LoRA off); the frontend sets it from its first engine."""

    def __init__(self, base_model_name: str = "", max_lora_rank: int = 0) -> None:
        self.base_model_name, self.max_lora_rank = base_model_name, max_lora_rank
        self._by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def load(self, name: str, path: str) -> LoRARequest:
        """Add an adapter; ValueError for a bad name, a name in use or an adapter that cannot run."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"lora_name must be a non-empty string, got {name!r}")
        if not isinstance(path, str) or not path:
            raise ValueError(f"lora_path must be a non-empty string, got {path!r}")
        if not self.max_lora_rank:
            raise ValueError("LoRA is not enabled: serve with --enable-lora to load adapters")
        if name == self.base_model_name:
            raise ValueError(f"lora_name {name!r} is the base model's name")
        if name in self._by_name:
            raise ValueError(f"the LoRA adapter {name!r} has already been loaded")
        read_adapter_config(path, name, self.max_lora_rank)
        request = LoRARequest(name, next(self._ids), path)
        self._by_name[name] = request
        return request

    def unload(self, name: str) -> LoRARequest:
        """KeyError when no adapter has that name."""
        if name not in self._by_name:
            raise KeyError(f"the LoRA adapter {name!r} is not loaded")
        return self._by_name.pop(name)

    def get(self, name: str) -> LoRARequest | None:
        return self._by_name.get(name)

    def __iter__(self):
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)


def parse_lora_modules(specs: list[str]) -> list[tuple[str, str]]:
    """`--lora-modules name=path ...` as (name, path) pairs; ValueError naming a malformed one."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes name=path, got {spec!r}")
        out.append((name, path))
    return out
