"""Linear layers split over tensor-parallel ranks (Megatron style, vLLM's names).

Column-parallel layers split the output features, row-parallel ones the input
features. Each parameter's `weight_loader(param, loaded_weight, shard_id=None)`
receives the *full* checkpoint tensor (or a lazy slice) and keeps this rank's
shard; a shape that does not match the unsharded layer raises ValueError.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedray.kernels import ops
from pagedray.models.layers.distributed import (divide, get_tp_rank, get_tp_world_size, tp_all_gather,
                                                tp_all_reduce)
from pagedray.models.layers.weights import (WeightLike, check_shape, default_weight_loader, narrow,
                                            set_weight_loader)


class LinearBase(nn.Module):
    """Holds weight [out_per_rank, in_per_rank] (and bias) in the default dtype/device."""

    # Set by models/layers/quantization on quantized layers: owns their weights and product.
    quant_method = None

    def __init__(self, in_per_rank: int, out_per_rank: int, bias: bool) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.weight = set_weight_loader(nn.Parameter(torch.empty(out_per_rank, in_per_rank), requires_grad=False),
                                        self.weight_loader)
        if bias:
            self.bias = set_weight_loader(
                nn.Parameter(torch.empty(out_per_rank), requires_grad=False), self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id=None) -> None:
        raise NotImplementedError

    def rank_bias(self) -> torch.Tensor | None:
        """The bias this rank adds to its product (None: none)."""
        return self.bias

    def rank_input(self, x: torch.Tensor) -> torch.Tensor:
        """The part of the layer's input this rank multiplies."""
        return x

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, bias)
        return ops.linear(x, self.weight, bias)

    def extra_repr(self) -> str:
        out, inp = self.weight.shape
        return f"in_per_rank={inp}, out_per_rank={out}, bias={self.bias is not None}, tp={self.tp_size}"


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole layer."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True) -> None:
        super().__init__(input_size, output_size, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id=None) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """y = xA^T + b with A split along its output rows; rank r owns rows [r*n, (r+1)*n)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = False) -> None:
        super().__init__(input_size, divide(output_size, get_tp_world_size(), "output_size"), bias)
        self.input_size, self.output_size, self.gather_output = input_size, output_size, gather_output

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard_id, got {shard_id!r}")
        check_shape(loaded_weight, (self.output_size, *param.shape[1:]))
        rows = param.shape[0]
        param.data.copy_(narrow(loaded_weight, 0, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.bias)
        return tp_all_gather(y, dim=-1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers fused along the output (e.g. gate_proj + up_proj).

    Each rank stores [its shard of output 0; its shard of output 1; ...].
    `shard_id` is the index of the sub-layer a checkpoint tensor belongs to;
    None means the checkpoint already holds the fused tensor.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = True,
                 gather_output: bool = False) -> None:
        for i, size in enumerate(output_sizes):
            divide(size, get_tp_world_size(), f"output_sizes[{i}]")
        super().__init__(input_size, sum(output_sizes), bias, gather_output)
        self.output_sizes = list(output_sizes)

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id=None) -> None:
        if shard_id is None:
            return self._load_fused(param, loaded_weight)
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"shard_id must be an int in [0, {len(self.output_sizes)}), got {shard_id!r}")
        full = self.output_sizes[shard_id]
        check_shape(loaded_weight, (full, *param.shape[1:]))
        size = full // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(narrow(loaded_weight, 0, self.tp_rank * size, size))

    def _load_fused(self, param: nn.Parameter, loaded_weight: WeightLike) -> None:
        check_shape(loaded_weight, (self.output_size, *param.shape[1:]))
        start = 0
        for i, size in enumerate(self.output_sizes):
            self.weight_loader(param, narrow(loaded_weight, 0, start, size), i)
            start += size


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection; each rank holds its query heads and their key/value heads.

    With fewer KV heads than ranks each KV head is replicated on
    tp_size // total_num_kv_heads consecutive ranks (those whose query heads
    attend to it), so every rank holds exactly one.
    """

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = True) -> None:
        tp = get_tp_world_size()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        num_heads = divide(total_num_heads, tp, "num_attention_heads")
        if total_num_kv_heads >= tp:
            num_kv_heads, replicas = divide(total_num_kv_heads, tp, "num_key_value_heads"), 1
        elif tp % total_num_kv_heads:
            raise ValueError(f"the tensor-parallel size ({tp}) must be a multiple of "
                             f"num_key_value_heads ({total_num_kv_heads}) when it is larger")
        else:
            num_kv_heads, replicas = 1, tp // total_num_kv_heads
        # Not ColumnParallelLinear.__init__: with replicated KV heads the per-rank size is not total / tp.
        LinearBase.__init__(self, hidden_size, (num_heads + 2 * num_kv_heads) * head_size, bias)
        self.input_size, self.gather_output = hidden_size, False
        self.output_size = (total_num_heads + 2 * total_num_kv_heads) * head_size
        self.head_size, self.num_heads, self.num_kv_heads = head_size, num_heads, num_kv_heads
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_kv_head_replicas = replicas

    def _shard_layout(self, shard_id: str) -> tuple[int, int, int, int]:
        """(offset in this rank's param, rows per rank, first checkpoint row, total checkpoint rows)."""
        q_rows, kv_rows = self.num_heads * self.head_size, self.num_kv_heads * self.head_size
        kv_rank = self.tp_rank // self.num_kv_head_replicas
        total_kv = self.total_num_kv_heads * self.head_size
        layouts = {
            "q": (0, q_rows, self.tp_rank * q_rows, self.total_num_heads * self.head_size),
            "k": (q_rows, kv_rows, kv_rank * kv_rows, total_kv),
            "v": (q_rows + kv_rows, kv_rows, kv_rank * kv_rows, total_kv),
        }
        if shard_id not in layouts:
            raise ValueError(f"shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        return layouts[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id=None) -> None:
        if shard_id is None:
            return self._load_fused(param, loaded_weight)
        offset, rows, start, total = self._shard_layout(shard_id)
        check_shape(loaded_weight, (total, *param.shape[1:]))
        param.data.narrow(0, offset, rows).copy_(narrow(loaded_weight, 0, start, rows))

    def _load_fused(self, param: nn.Parameter, loaded_weight: WeightLike) -> None:
        check_shape(loaded_weight, (self.output_size, *param.shape[1:]))
        start = 0
        for shard_id in ("q", "k", "v"):
            total = self._shard_layout(shard_id)[3]
            self.weight_loader(param, narrow(loaded_weight, 0, start, total), shard_id)
            start += total


class RowParallelLinear(LinearBase):
    """y = xA^T + b with A split along its input columns; partial products are summed.

    The bias is added once (on rank 0, before the all-reduce) so the sum holds it once.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = True,
                 reduce_results: bool = True) -> None:
        super().__init__(divide(input_size, get_tp_world_size(), "input_size"), output_size, bias)
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel, self.reduce_results = input_is_parallel, reduce_results

    def rank_bias(self) -> torch.Tensor | None:
        """Rank 0's only: the all-reduce sums the partial products, and so would sum every rank's bias."""
        return self.bias if self.tp_rank == 0 else None

    def rank_input(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's input columns; an input already split across ranks (input_is_parallel) as it is."""
        if self.input_is_parallel or self.tp_size == 1:
            return x
        cols = self.weight.shape[1]
        return x.narrow(-1, self.tp_rank * cols, cols)

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard_id, got {shard_id!r}")
        if param.dim() == 1:  # bias: replicated
            return default_weight_loader(param, loaded_weight)
        check_shape(loaded_weight, (self.output_size, self.input_size))
        cols = param.shape[1]
        param.data.copy_(narrow(loaded_weight, 1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(self.rank_input(x), self.rank_bias())
        return tp_all_reduce(y) if self.reduce_results else y


__all__ = ["ReplicatedLinear", "ColumnParallelLinear", "MergedColumnParallelLinear", "QKVParallelLinear",
           "RowParallelLinear"]
