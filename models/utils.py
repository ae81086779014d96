"""The generic `load_weights` every model delegates to.

A model declares `packed_modules_mapping`, e.g.
    {"qkv_proj": [("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")],
     "gate_up_proj": [("gate_proj", 0), ("up_proj", 1)]}
and checkpoint names are renamed onto its fused parameters; each parameter's
`weight_loader` then keeps this rank's shard.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

from torch import nn

from pagedray.models.layers.pipeline import missing_prefixes
from pagedray.models.layers.weights import default_weight_loader

PackedMapping = dict[str, list[tuple[str, Any]]]

# Checkpoint tensors that are buffers recomputed at build time, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def rename_packed(name: str, mapping: PackedMapping) -> tuple[str, str | None, Any]:
    """(parameter name, packed module name or None, shard id) of a checkpoint name."""
    parts = name.split(".")
    for packed, members in mapping.items():
        for member, shard_id in members:
            if member in parts[:-1]:
                i = parts.index(member)
                return ".".join(parts[:i] + [packed] + parts[i + 1:]), packed, shard_id
    return name, None, None


def load_packed_weights(model: nn.Module, weights: Iterable[tuple[str, Any]],
                        mapping: PackedMapping | None = None, skip: Iterable[str] = ()) -> set[str]:
    """Load (name, tensor-or-slice) pairs; return the names of fully loaded parameters.

    Raises ValueError for a checkpoint tensor the model has no parameter for,
    and re-raises a loader's ValueError with the tensor's name. Names in
    `skip` (e.g. a tied `lm_head.weight`) and IGNORED_SUFFIXES are dropped, and so are tensors of
    modules another pipeline stage holds (never read).
    A fused parameter missing some of its members raises ValueError naming them.
    """
    mapping = mapping or {}
    skip = set(skip)
    other_stages = missing_prefixes(model)
    params = dict(model.named_parameters())
    seen_shards: dict[str, set] = defaultdict(set)
    for name, loaded in weights:
        if name in skip or name.endswith(IGNORED_SUFFIXES) or name.startswith(other_stages):
            continue
        target, packed, shard_id = rename_packed(name, mapping)
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no parameter in {type(model).__name__} "
                             f"(looked for {target!r})")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, loaded) if packed is None else loader(param, loaded, shard_id)
        except ValueError as e:
            raise ValueError(f"loading checkpoint tensor {name!r} into {target!r}: {e}") from None
        seen_shards[target].add(shard_id if packed is not None else None)
    loaded_names = set()
    for target, shards in seen_shards.items():
        packed = packed_module_of(target, mapping)
        if packed is None or None in shards:
            loaded_names.add(target)
            continue
        absent = [m for m, sid in mapping[packed] if sid not in shards]
        if absent:
            names = [checkpoint_name(target, packed, m) for m in absent]
            raise ValueError(f"the checkpoint is missing {names} (fused into {target!r} with the others)")
        loaded_names.add(target)
    return loaded_names


def packed_module_of(param_name: str, mapping: PackedMapping) -> str | None:
    parts = param_name.split(".")[:-1]
    return next((p for p in mapping if p in parts), None)


def checkpoint_name(param_name: str, packed: str, member: str) -> str:
    """The checkpoint name of one member of a fused parameter."""
    return ".".join(member if part == packed else part for part in param_name.split("."))
