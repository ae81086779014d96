"""A drafter under tensor parallelism: every TP rank runs its shards of the drafter's forwards.

The drafter (a draft model or an EAGLE head) is built of the same parallel layers as the target, on
the same ranks and process group, with a KV cache per rank that holds this rank's KV heads on the
target's block ids. Its collectives only add up when every rank feeds it the same tokens:
- proposals: every rank takes the argmax of the all-gathered (full-vocabulary) logits, as the
  target's logits are gathered, so every rank proposes the same tokens from the same hidden states;
- verified tokens: only the sampling rank verifies (its sampler's generator and grammar state live
  there), so its tokens are broadcast to the other ranks before the drafter catches up on them.
Only the sampling rank's proposals travel up to the driver.
"""
from __future__ import annotations

import numpy as np
import torch

from pagedray.models.layers.distributed import get_tp_world_size, tp_broadcast


def share_verified(tokens: list[list[int]] | None, num_groups: int, width: int,
                   device: torch.device) -> list[list[int]]:
    """The sampling rank's verified tokens per group (up to `width` each) on every TP rank; `tokens`
    is None on the ranks that did not verify. One small broadcast per step, at TP > 1 only."""
    if get_tp_world_size() == 1:
        return tokens
    buf = np.full((num_groups, width), -1, dtype=np.int64)   # token ids are >= 0: -1 pads
    for i, toks in enumerate(tokens or ()):
        buf[i, :len(toks)] = toks
    shared = tp_broadcast(torch.from_numpy(buf).to(device))
    if tokens is not None:   # the sampling rank has them already: no wait for the broadcast here
        return tokens
    return [[t for t in row if t >= 0] for row in shared.tolist()]
