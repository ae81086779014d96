"""Learned absolute position embeddings (GPT-2's `wpe`, OPT's `embed_positions`).

The table is looked up with each flat token's own position, so prefill,
chunked prefill and decode tokens of different sequences mix freely in one
step. It is replicated on every rank: max_positions x hidden is small next to
the vocabulary table, and replicating it avoids an all-reduce per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LearnedPositionalEmbedding(nn.Module):
    """weight [num_positions + offset, dim]; position p reads row p + offset.

    `offset` is 2 for OPT, whose checkpoints reserve the first two rows
    (a fairseq padding convention); 0 for GPT-2.
    """

    def __init__(self, num_positions: int, embedding_dim: int, offset: int = 0) -> None:
        super().__init__()
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self.num_positions, self.offset = num_positions, offset
        self.weight = nn.Parameter(torch.empty(num_positions + offset, embedding_dim), requires_grad=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + self.offset, self.weight)

    def extra_repr(self) -> str:
        return f"positions={self.num_positions}, dim={self.weight.shape[1]}, offset={self.offset}"
