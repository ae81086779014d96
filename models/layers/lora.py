"""LoRA layers: a tensor-parallel linear layer plus a stack of adapters, one per device slot.

`apply_lora(model, ...)` wraps every column- and row-parallel linear layer of a built model
(q/k/v/o and the MLP; the LM head and embeddings are left alone) in a `LoRALinear` that adds,
per token, its adapter's delta (x A^T) B^T to the base output. All layers share one
`LoRAContext` holding the step's token -> slot map (indices, their order, a one-hot mask), so a
batch mixes adapters (and tokens without one); each layer's delta is two batched kernel calls or,
for a forward of many tokens, two dense GEMMs over every slot (kernels/lora.py).

Sharding follows the base layer: a column-parallel layer keeps A whole and its B rows of the
output it owns (per q/k/v or gate/up part, exactly as its weight_loader places the base
weight); a row-parallel layer keeps A's columns of the input it owns and B whole, and adds its
partial delta before the layer's one all-reduce (the sum over ranks of x_r A_r^T B^T is the delta).

A slot's stacks hold `groups` blocks of max_lora_rank: one per checkpoint module fused into
the layer (q, k, v of qkv_proj), with B block-diagonal over them; ranks below the maximum are
zero-padded, and the scale (lora_alpha / r) is folded into B. B is kept transposed ([slots,
width, out]), so that every slot's B together is one [slots * width, out] matrix.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pagedray.kernels.lora import lora_delta, lora_delta_dense, lora_linear_dense, lora_path
from pagedray.models.layers.distributed import tp_all_reduce
from pagedray.models.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                           RowParallelLinear)

# (row of the full checkpoint B, row of this rank's output, rows)
Piece = tuple[int, int, int]


class LoRAContext:
    """The step's token -> slot map, shared by every LoRA layer (persistent buffers: graph-safe).

    `indices[t]` is token t's slot (-1: no adapter); `order` the tokens sorted by slot; `mask[t]`
    the one-hot row of token t's slot (zeros: none). Past the last step's tokens they hold -1, the
    identity and zeros, so a replayed decode graph (whose batch is padded up to its bucket) sees
    every row exactly once and its padding rows without an adapter.
    `active` is False in a step without adapters, whose eager forward then skips LoRA entirely; it
    starts True so that profiling and graph capture include the LoRA kernels (a replay always runs
    them).
    """

    def __init__(self, max_loras: int, max_lora_rank: int, max_num_tokens: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.indices = torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device)
        self.order = torch.arange(max_num_tokens, dtype=torch.int32, device=device)
        self.mask = torch.zeros(max_num_tokens, max_loras, dtype=dtype, device=device)
        self._slot_ids = torch.arange(max_loras, dtype=torch.int32, device=device)
        self.active = True
        self._written = 0   # rows [0, _written) may differ from -1 / the identity

    def set_tokens(self, slots: np.ndarray) -> None:
        """This step's slot per flat token (int array, -1 for none)."""
        n = len(slots)
        if n > self.indices.shape[0]:
            raise ValueError(f"a step of {n} tokens is above the LoRA buffers' max_num_tokens="
                             f"{self.indices.shape[0]}")
        self.active = bool(n) and bool((slots >= 0).any())
        m = max(n if self.active else 0, self._written)   # also reset what the last step left
        if m == 0:
            return
        host = torch.empty(2, m, dtype=torch.int32, pin_memory=self.indices.is_cuda)
        rows = host.numpy()
        rows[0] = -1
        rows[1] = np.arange(m)
        if self.active:
            rows[0, :n] = slots
            rows[1, :n] = np.argsort(slots, kind="stable")
        dev = host.to(self.indices.device, non_blocking=True)   # stream-ordered after the step in flight
        self.indices[:m].copy_(dev[0])
        self.order[:m].copy_(dev[1])
        # The one-hot rows, built on the device from the indices (no host copy of T x slots).
        self.mask[:m].copy_(self.indices[:m, None] == self._slot_ids)
        self._written = n if self.active else 0


class LoRALinear(nn.Module):
    """`base(x)` plus each token's adapter delta; `groups` are the checkpoint modules it holds."""

    def __init__(self, base: nn.Module, ctx: LoRAContext, groups: list[tuple[str, Any]],
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base, self.ctx, self.groups = base, ctx, groups
        self.row_parallel = isinstance(base, RowParallelLinear)
        self.tp_rank, self.tp_size = base.tp_rank, base.tp_size
        if self.row_parallel:
            self.in_per_rank, self.out_per_rank = base.input_size // self.tp_size, base.output_size
            # The delta joins the partial product before the layer's one all-reduce, done here.
            self.reduce_results, base.reduce_results = base.reduce_results, False
        else:
            self.in_per_rank = base.input_size
            self.out_per_rank = sum(rows for _, _, rows in self.pieces(None if len(groups) > 1 else groups[0][1]))
        width = len(groups) * ctx.max_lora_rank
        self.register_buffer("lora_a", torch.zeros(ctx.max_loras, width, self.in_per_rank, dtype=dtype,
                                                   device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(ctx.max_loras, width, self.out_per_rank, dtype=dtype,
                                                   device=device), persistent=False)

    # -- sharding --------------------------------------------------------------
    def pieces(self, shard_id: Any) -> list[Piece]:
        """Where the rows of a checkpoint B for `shard_id` go on this rank (None: the whole layer)."""
        base, rank, tp = self.base, self.tp_rank, self.tp_size
        if self.row_parallel:
            return [(0, 0, base.output_size)]
        if isinstance(base, QKVParallelLinear):
            if shard_id is None:
                out, src = [], 0
                for sid in ("q", "k", "v"):
                    (piece,), total = self._qkv_piece(sid)
                    out.append((src + piece[0], piece[1], piece[2]))
                    src += total
                return out
            return self._qkv_piece(shard_id)[0]
        if isinstance(base, MergedColumnParallelLinear):
            ids = range(len(base.output_sizes)) if shard_id is None else [shard_id]
            out = []
            for i in ids:
                size = base.output_sizes[i] // tp
                src = sum(base.output_sizes[:i]) if shard_id is None else 0
                out.append((src + rank * size, sum(base.output_sizes[:i]) // tp, size))
            return out
        rows = base.output_size // tp
        return [(rank * rows, 0, rows)]

    def _qkv_piece(self, sid: str) -> tuple[list[Piece], int]:
        offset, rows, start, total = self.base._shard_layout(sid)
        return [(start, offset, rows)], total

    def full_b_rows(self, shard_id: Any) -> int:
        """Rows a checkpoint B for `shard_id` must have (the unsharded output of that part)."""
        base = self.base
        if shard_id is None or self.row_parallel:
            return base.output_size
        if isinstance(base, QKVParallelLinear):
            return self._qkv_piece(shard_id)[1]
        return base.output_sizes[shard_id]

    def shard_a(self, a: torch.Tensor) -> torch.Tensor:
        if not self.row_parallel:
            return a
        return a.narrow(1, self.tp_rank * self.in_per_rank, self.in_per_rank)

    def build(self, parts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One adapter's (A, B^T) slot contents from {group: (full A [r, in], full scaled B [out, r])}."""
        r_max = self.ctx.max_lora_rank
        a_cat = torch.zeros(self.lora_a.shape[1:], dtype=self.lora_a.dtype)
        b_cat = torch.zeros(self.lora_b.shape[1:], dtype=self.lora_b.dtype)
        for g, (a, b) in parts.items():
            r = a.shape[0]
            a_cat[g * r_max:g * r_max + r] = self.shard_a(a)
            for src, dst, rows in self.pieces(self.groups[g][1]):
                b_cat[g * r_max:g * r_max + r, dst:dst + rows] = b[src:src + rows].t()
        return a_cat, b_cat

    def set_slot(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Load an adapter's (A, B) from `build` into `slot` (None: zeros)."""
        if weights is None:
            self.lora_a[slot].zero_()
            self.lora_b[slot].zero_()
        else:
            self.lora_a[slot].copy_(weights[0])
            self.lora_b[slot].copy_(weights[1])

    # -- forward ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if not ctx.active:
            y = self.base(x)
        else:
            xin = self.base.rank_input(x).contiguous()
            n = xin.shape[0]
            if n > ctx.indices.shape[0]:   # (a kernel would read past the slot map: refuse, at capture too)
                raise ValueError(f"a forward of {n} tokens is above the LoRA buffers' max_num_tokens="
                                 f"{ctx.indices.shape[0]}")
            path = lora_path(n, self.in_per_rank, self.out_per_rank, self.base.quant_method is not None)
            if path == "kernels":
                y = lora_delta(self.base(x), xin, self.lora_a, self.lora_b, ctx.indices[:n], ctx.order[:n])
            elif path == "fused":   # the base GEMM accumulates onto the delta
                y = lora_linear_dense(xin, self.base.weight, self.base.rank_bias(), self.lora_a, self.lora_b,
                                      ctx.mask[:n])
            else:
                y = lora_delta_dense(self.base(x), xin, self.lora_a, self.lora_b, ctx.mask[:n])
        if self.row_parallel and self.reduce_results:
            y = tp_all_reduce(y)
        return y


def apply_lora(model: nn.Module, max_loras: int, max_lora_rank: int, max_num_tokens: int,
               dtype: torch.dtype, device: torch.device) -> tuple[LoRAContext, dict[str, LoRALinear]]:
    """Wrap the model's linear layers; returns the shared context and {module name: layer}.

    Module names are the model's (HF's: `model.layers.0.self_attn.qkv_proj`); the checkpoint
    names each layer holds (`...q_proj`) come from the model's packed_modules_mapping.
    """
    ctx = LoRAContext(max_loras, max_lora_rank, max_num_tokens, device, dtype)
    mapping = getattr(model, "packed_modules_mapping", {})
    head = getattr(model, "lm_head_name", "lm_head")
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, (ColumnParallelLinear, RowParallelLinear)) and not name.startswith(head)
               and not getattr(mod, "gather_output", False)]
    layers: dict[str, LoRALinear] = {}
    for name, mod in targets:
        parent_name, _, leaf = name.rpartition(".")
        prefix = parent_name + "." if parent_name else ""
        groups = [(prefix + member, sid) for member, sid in mapping[leaf]] if leaf in mapping else [(name, None)]
        layer = LoRALinear(mod, ctx, groups, dtype, device)
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer)
        layers[name] = layer
    return ctx, layers


__all__ = ["LoRAContext", "LoRALinear", "apply_lora"]
