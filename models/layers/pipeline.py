"""Pipeline parallelism, as a model file sees it: which layers this stage holds, and what passes
between stages.

A model of `num_layers` layers run over `num_stages` stages gives each stage a contiguous range of
layers (`stage_layer_range`). The first stage embeds the tokens, the last applies the final norm and
the LM head; a stage that is not the last returns `IntermediateTensors` (the hidden states, plus the
residual where the model keeps one apart) that the next stage receives as its input.

Layers and modules a stage does not hold are `PPMissing` placeholders: they have no parameters, so
parameter names stay HF's (`model.layers.7...` is layer 7 on whichever stage holds it), the strict
loader expects exactly this stage's weights, and checkpoint tensors under a placeholder are skipped
unread (`models/utils.py`).

Which stage is being built is read from the distributed state (`distributed.get_pp_rank()`), as
the tensor-parallel layers read their rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from pagedray.models.layers.distributed import get_pp_rank, get_pp_world_size


@dataclass(frozen=True)
class PipelineStage:
    index: int = 0
    num_stages: int = 1

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1


def current_stage() -> PipelineStage:
    """The stage this process builds and runs (stage 0 of 1 without pipeline parallelism)."""
    return PipelineStage(get_pp_rank(), get_pp_world_size())


def stage_layer_range(num_layers: int, stage: int, num_stages: int) -> tuple[int, int]:
    """[start, end) of the layers stage `stage` holds: contiguous, as even as possible; when the
    layers do not divide evenly, the earlier stages take one more (the last also holds the LM head)."""
    if num_stages < 1 or not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is not a stage of pipeline_parallel_size={num_stages}")
    if num_layers < num_stages:
        raise ValueError(f"pipeline_parallel_size ({num_stages}) is larger than the model's number of "
                         f"layers ({num_layers}): every stage needs at least one layer")
    base, extra = divmod(num_layers, num_stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (stage < extra)


class PPMissing(nn.Module):
    """Stands where a module of another stage would be: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module belongs to another pipeline stage")


class IntermediateTensors(dict):
    """What one stage hands the next: name -> [num_tokens, hidden] tensor (e.g. "hidden_states",
    "residual"). Every tensor has one row per token of the step, so the receiver can size its buffers
    from the step alone (`CausalLM.empty_intermediate_tensors`)."""


class StageLayers(nn.ModuleList):
    """All `num_layers` layer slots of a decoder stack: this stage's built by `build(i)`, the others
    `PPMissing`. `with_caches(kv_caches)` pairs this stage's layers with its KV caches (one per
    layer it holds, in order)."""

    def __init__(self, num_layers: int, build: Callable[[int], nn.Module]) -> None:
        self.stage = current_stage()
        self.start, self.end = stage_layer_range(num_layers, self.stage.index, self.stage.num_stages)
        super().__init__(build(i) if self.start <= i < self.end else PPMissing() for i in range(num_layers))
        # A plain list (not registered again): what every forward walks.
        self.own_layers = [self[i] for i in range(self.start, self.end)]

    def with_caches(self, kv_caches: list[torch.Tensor]) -> Iterator[tuple[nn.Module, torch.Tensor]]:
        return zip(self.own_layers, kv_caches, strict=True)


def missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes ("model.layers.3.") of the placeholders in `model`: checkpoint tensors under
    them belong to other stages."""
    return tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, PPMissing))
