"""Mixture-of-experts: top-k routing and a bank of gated expert MLPs, in plain PyTorch.

Tensor parallelism: every rank holds a 1/tp slice of *every* expert's
intermediate dimension (vLLM's default), not a subset of whole experts.
Why: each rank then does the same share of the work for every token whatever
the router picks (with expert-parallel subsets, a rank owning popular experts
becomes the straggler every layer waits for); it needs only
intermediate_size % tp == 0, like a dense MLP, not num_experts % tp == 0; and
the combine is the one all-reduce a dense MLP already pays, because each
rank's output is a partial sum of the same weighted expert outputs.
The router is replicated, so every rank picks the same experts.

Checkpoints store experts one tensor each (`<prefix>.<e>.w1.weight` ...);
`load_weights_with_experts` stacks them into [E, ...] parameters, the layout
a fused kernel wants.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from pagedray.models.layers.activation import get_act_and_mul_fn
from pagedray.models.layers.distributed import divide, get_tp_rank, get_tp_world_size, tp_all_reduce
from pagedray.models.layers.weights import WeightLike, check_shape, narrow, set_weight_loader
from pagedray.models.utils import PackedMapping, load_packed_weights

# Which part of an expert MLP a checkpoint tensor is.
GATE, UP, DOWN = "gate", "up", "down"


def select_experts(router_logits: torch.Tensor, top_k: int,
                   renormalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] float32, expert ids [T, k]): softmax over experts in float32, then top-k."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor, act_and_mul: nn.Module) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]); x [T, H], w13 [E, 2I, H], w2 [E, H, I].

    Loops over the experts that were picked, gathering their tokens; sums in float32.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in topk_ids.unique().tolist():
        token_idx, slot = torch.where(topk_ids == expert)
        h = act_and_mul(torch.nn.functional.linear(x[token_idx], w13[expert]))
        h = torch.nn.functional.linear(h, w2[expert])
        out.index_add_(0, token_idx, h.float() * topk_weights[token_idx, slot, None])
    return out.to(x.dtype)


def moe_experts_dense(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, act_and_mul: nn.Module) -> torch.Tensor:
    """The same sum with every expert run on every token (weight 0 where not picked).

    No shape depends on the routing and nothing syncs with the host, so a CUDA
    graph can capture it; it costs num_experts / top_k times the expert work.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in range(w13.shape[0]):
        weight = (topk_weights * (topk_ids == expert)).sum(dim=-1, keepdim=True)  # [T, 1], 0 if not picked
        h = torch.nn.functional.linear(act_and_mul(torch.nn.functional.linear(x, w13[expert])), w2[expert])
        out += h.float() * weight
    return out.to(x.dtype)


class FusedMoE(nn.Module):
    """num_experts gated MLPs; w13_weight [E, 2*I/tp, H] (this rank's gate rows then up rows), w2_weight [E, H, I/tp].

    forward(x [T, H], router_logits [T, E]) -> [T, H], all-reduced over the TP ranks
    unless reduce_results is False.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 hidden_act: str = "silu", renormalize: bool = True, reduce_results: bool = True) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in [1, num_local_experts={num_experts}]")
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.reduce_results = reduce_results
        self.shard = divide(intermediate_size, self.tp_size, "intermediate_size")
        self.w13_weight = set_weight_loader(
            nn.Parameter(torch.empty(num_experts, 2 * self.shard, hidden_size), requires_grad=False),
            self.weight_loader)
        self.w2_weight = set_weight_loader(
            nn.Parameter(torch.empty(num_experts, hidden_size, self.shard), requires_grad=False),
            self.weight_loader)
        self.act_fn = get_act_and_mul_fn(hidden_act)

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id: tuple[int, str]) -> None:
        """Load one expert's full gate [I, H], up [I, H] or down [H, I] tensor; keep this rank's slice."""
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert id {expert} is outside [0, num_experts={self.num_experts})")
        start = self.tp_rank * self.shard
        if part == DOWN:
            check_shape(loaded_weight, (self.hidden_size, self.intermediate_size))
            param.data[expert].copy_(narrow(loaded_weight, 1, start, self.shard))
        elif part in (GATE, UP):
            check_shape(loaded_weight, (self.intermediate_size, self.hidden_size))
            rows = slice(0, self.shard) if part == GATE else slice(self.shard, 2 * self.shard)
            param.data[expert, rows].copy_(narrow(loaded_weight, 0, start, self.shard))
        else:
            raise ValueError(f"expert part must be {GATE!r}, {UP!r} or {DOWN!r}, got {part!r}")

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        # The routed loop syncs with the host (which experts were picked); decode CUDA graphs need the dense form.
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        experts = moe_experts_dense if capturing else moe_experts_reference
        out = experts(x, self.w13_weight, self.w2_weight, topk_weights, topk_ids, self.act_fn)
        return tp_all_reduce(out) if self.reduce_results else out

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, top_k={self.top_k}, hidden={self.hidden_size}, "
                f"intermediate_per_rank={self.shard}, tp={self.tp_size}")


def load_weights_with_experts(model: nn.Module, weights: Iterable[tuple[str, Any]], mapping: PackedMapping,
                              expert_names: dict[str, str], skip: Iterable[str] = ()) -> set[str]:
    """`load_packed_weights`, plus per-expert checkpoint tensors stacked into each FusedMoE.

    expert_names maps a checkpoint's per-expert tensor name to its part, e.g. Mixtral's
    {"w1": GATE, "w3": UP, "w2": DOWN} for `<moe>.<e>.w1.weight`, where <moe> is the
    FusedMoE module's name. Raises ValueError naming every missing expert tensor.
    """
    if sorted(expert_names.values()) != sorted((GATE, UP, DOWN)):
        raise ValueError(f"expert_names must map one name to each of {GATE!r}, {UP!r}, {DOWN!r}, got {expert_names}")
    moes = {name: m for name, m in model.named_modules() if isinstance(m, FusedMoE)}
    pattern = re.compile(r"^(.*)\.(\d+)\.(" + "|".join(map(re.escape, expert_names)) + r")\.weight$")
    seen: dict[str, set[tuple[int, str]]] = {name: set() for name in moes}

    def others() -> Iterator[tuple[str, Any]]:
        for name, loaded in weights:
            match = pattern.match(name)
            if match is None or match.group(1) not in moes:
                yield name, loaded
                continue
            prefix, expert, part = match.group(1), int(match.group(2)), expert_names[match.group(3)]
            moe = moes[prefix]
            param = moe.w2_weight if part == DOWN else moe.w13_weight
            try:
                moe.weight_loader(param, loaded, (expert, part))
            except ValueError as e:
                raise ValueError(f"loading checkpoint tensor {name!r}: {e}") from None
            seen[prefix].add((expert, match.group(3)))

    loaded = load_packed_weights(model, others(), mapping, skip)
    missing = [f"{prefix}.{e}.{ckpt}.weight" for prefix, moe in moes.items()
               for e in range(moe.num_experts) for ckpt in expert_names if (e, ckpt) not in seen[prefix]]
    if missing:
        shown = missing[:8] + ([f"... {len(missing) - 8} more"] if len(missing) > 8 else [])
        raise ValueError(f"the checkpoint is missing {len(missing)} expert weight(s): {shown}")
    return loaded | {f"{prefix}.{p}" for prefix in moes for p in ("w13_weight", "w2_weight")}
