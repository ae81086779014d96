"""FP8 linear layers: the parameters a quantized layer holds, how each checkpoint tensor shards onto
them, and the product it runs (`pagedray.kernels.fp8.fp8_linear`).

A quantized layer keeps its `weight` (now float8_e4m3fn, sharded by the layer's own weight_loader)
and gains float32 scales named as in the checkpoint:
- `weight_scale` [N_rank]: per output row; a per-tensor checkpoint scale is written into the rows of
  its tensor (so q, k and v fused into one layer keep their own scales, and a column split takes
  the rows' scales along);
- `weight_scale_inv` [N_rank, Kb_rank] (block-wise): each block row's scales repeated over the rows
  of the block, so any column split keeps exact scales; a row split cuts the k-blocks and needs
  whole blocks per rank;
- `input_scale` [1] (static activations): replicated; q/k/v's (or gate/up's) take their maximum.
A missing scale is reported by the loader's completeness check, a left-over one by the absence of
a parameter to load it into: both name the tensor.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedray.kernels.fp8 import FP8_DTYPE, FP8_MAX, fp8_linear, quantize_weight_per_channel
from pagedray.models.layers.linear import LinearBase, ReplicatedLinear, RowParallelLinear
from pagedray.models.layers.quantization.config import Fp8Config
from pagedray.models.layers.weights import WeightLike, check_shape, materialize, narrow, set_weight_loader


def _dtype_of(loaded: WeightLike) -> str:
    return str(loaded.dtype) if isinstance(loaded, torch.Tensor) else str(loaded.get_dtype())


def _is_fp8(loaded: WeightLike) -> bool:
    return _dtype_of(loaded) in ("torch.float8_e4m3fn", "F8_E4M3")


def _checkpoint_rows(layer: LinearBase, shard_id) -> int:
    """Output rows of the checkpoint tensor that `shard_id` names (the whole layer when None)."""
    if shard_id is None:
        return getattr(layer, "output_size", layer.weight.shape[0])
    if isinstance(shard_id, str):
        return layer._shard_layout(shard_id)[3]
    if isinstance(shard_id, int) and 0 <= shard_id < len(getattr(layer, "output_sizes", ())):
        return layer.output_sizes[shard_id]
    raise ValueError(f"unknown shard_id {shard_id!r} for {type(layer).__name__}")


class Fp8LinearMethod:
    def __init__(self, config: Fp8Config) -> None:
        self.config = config

    # -- parameters -----------------------------------------------------------------------------
    def create_weights(self, layer: LinearBase) -> None:
        cfg = self.config
        if not cfg.from_checkpoint:
            return  # the 16/32-bit weight loads as usual and is quantized after loading
        n, k = layer.weight.shape
        device = layer.weight.device
        layer_loader = layer.weight.weight_loader
        del layer.weight  # free the 16-bit placeholder before the FP8 one exists

        def load_weight(param, loaded, shard_id=None):
            if not _is_fp8(loaded):
                raise ValueError(f"expected an FP8 (float8_e4m3fn) weight, got {_dtype_of(loaded)}; a layer "
                                 f"stored unquantized must be on the quantization config's ignore list")
            layer_loader(param, loaded) if shard_id is None else layer_loader(param, loaded, shard_id)

        layer.weight = set_weight_loader(nn.Parameter(torch.empty(n, k, dtype=FP8_DTYPE, device=device),
                                                      requires_grad=False), load_weight)
        cols = 1
        if cfg.weight_strategy == "block":
            cols = -(-k // cfg.block_size[1])
            if k % cfg.block_size[1]:  # the kernels and dequantize() read the k-block size off [N, Kb]
                raise ValueError(f"{type(layer).__name__}: its {k} input columns (per rank, tensor_parallel_size="
                                 f"{layer.tp_size}) are not whole weight blocks of {cfg.block_size[1]}")
        shape = (n, cols) if cfg.weight_strategy == "block" else (n,)
        scale = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=device), requires_grad=False)
        layer.register_parameter(cfg.scale_name, set_weight_loader(
            scale, lambda p, w, shard_id=None: self._load_scale(layer, p, w, shard_id)))
        if not cfg.dynamic:
            input_scale = nn.Parameter(torch.zeros(1, dtype=torch.float32, device=device), requires_grad=False)
            layer.input_scale = set_weight_loader(input_scale, self._load_input_scale)

    def _load_scale(self, layer: LinearBase, param: nn.Parameter, loaded: WeightLike, shard_id) -> None:
        cfg = self.config
        rows = _checkpoint_rows(layer, shard_id)
        t = materialize(loaded).float()
        if cfg.weight_strategy == "block":
            bn, bk = cfg.block_size
            k_total = getattr(layer, "input_size", layer.weight.shape[1])
            check_shape(t, (-(-rows // bn), -(-k_total // bk)))
            t = t.repeat_interleave(bn, dim=0)[:rows]
        elif t.numel() == 1:
            t = t.reshape(1, 1).expand(rows, 1)
        elif t.numel() == rows and cfg.weight_strategy == "channel":
            t = t.reshape(rows, 1)
        else:
            what = "1 per-tensor value" if cfg.weight_strategy == "tensor" else f"{rows} per-channel values"
            raise ValueError(f"scale shape {tuple(t.shape)} does not hold {what}")
        view = param.data.view(param.shape[0], -1)
        if isinstance(layer, RowParallelLinear):  # rows whole; block columns follow the input split
            cols = view.shape[1]
            view.copy_(narrow(t, 1, layer.tp_rank * cols, cols) if cfg.weight_strategy == "block" else t)
        elif isinstance(layer, ReplicatedLinear) or shard_id is None and not hasattr(layer, "output_size"):
            view.copy_(t)
        elif shard_id is None:
            layer.weight_loader(view, t.contiguous())
        else:
            layer.weight_loader(view, t.contiguous(), shard_id)

    @staticmethod
    def _load_input_scale(param: nn.Parameter, loaded: WeightLike, shard_id=None) -> None:
        t = materialize(loaded).float()
        if t.numel() != 1:
            raise ValueError(f"input_scale must hold one (per-tensor) value, got shape {tuple(t.shape)}")
        param.data.copy_(torch.maximum(param.data, t.reshape(1).to(param.device)))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if self.config.from_checkpoint:
            return
        wq, scale = quantize_weight_per_channel(layer.weight.data)
        del layer.weight
        layer.weight = nn.Parameter(wq, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    @torch.no_grad()
    def init_dummy(self, layer: LinearBase, gen: torch.Generator, high: float = 1e-2) -> None:
        """Random weights of about ±high (load_format="dummy"): e4m3 values over the whole range."""
        if not self.config.from_checkpoint:
            return
        w = torch.empty(layer.weight.shape, dtype=torch.float32, device=layer.weight.device)
        layer.weight.copy_(w.uniform_(-FP8_MAX, FP8_MAX, generator=gen).to(FP8_DTYPE))
        getattr(layer, self.config.scale_name).fill_(high / FP8_MAX)
        if not self.config.dynamic:
            layer.input_scale.fill_(1.0 / FP8_MAX)

    # -- forward --------------------------------------------------------------------------------
    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scale = getattr(layer, self.config.scale_name)
        return fp8_linear(x, layer.weight, scale, bias, getattr(layer, "input_scale", None))
