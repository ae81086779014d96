"""LoRAContext's persistent buffers: what a replayed decode graph (batch padded to its bucket)
reads must name every row once, with no adapter on the padding rows, whatever earlier steps left."""
from __future__ import annotations

import numpy as np
import torch

from pagedray.models.layers.lora import LoRAContext


def _check(ctx: LoRAContext, slots: list[int], bucket: int) -> None:
    n = len(slots)
    order = ctx.order[:bucket].tolist()
    assert sorted(order) == list(range(bucket))                 # each row once, none past the bucket
    assert ctx.indices[:n].tolist() == slots
    assert ctx.indices[n:].eq(-1).all()                          # padding: no adapter
    assert [slots[r] for r in order[:n]] == sorted(slots)        # the step's tokens sorted by slot
    one_hot = [[float(s == j) for j in range(ctx.max_loras)] for s in slots]
    assert ctx.mask[:n].tolist() == one_hot                      # the dense path's per-token slot rows
    assert ctx.mask[n:].eq(0).all()


def test_buffers_past_the_step_are_reset_for_padded_graph_batches():
    ctx = LoRAContext(max_loras=3, max_lora_rank=8, max_num_tokens=64, device=torch.device("cpu"))
    long = list(np.random.default_rng(0).integers(-1, 3, 40))
    ctx.set_tokens(np.array(long, dtype=np.int32))               # a prefill-sized step
    _check(ctx, long, 64)
    ctx.set_tokens(np.array([2, -1, 0], dtype=np.int32))         # then a decode batch of 3 in bucket 4
    _check(ctx, [2, -1, 0], 4)
    _check(ctx, [2, -1, 0], 64)
    ctx.set_tokens(np.array([-1, -1], dtype=np.int32))           # no adapter: eager skips, graphs see none
    assert not ctx.active
    assert ctx.indices.eq(-1).all() and ctx.order.tolist() == list(range(64)) and ctx.mask.eq(0).all()


def test_adapter_tensors_of_another_pipeline_stage_are_recognised():
    from pagedray.models.layers.pipeline import PPMissing
    from pagedray.models.lora_adapter import on_other_stage
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), PPMissing()])
    assert on_other_stage(model, "model.layers.1.self_attn.q_proj")        # skipped: stage 1 loads it
    assert not on_other_stage(model, "model.layers.0.self_attn.q_proj")    # ours: must have a LoRA layer
    assert not on_other_stage(model, "model.layers.7.self_attn.q_proj")    # past the model: refused
