"""Hidden states -> full-vocabulary logits on every rank."""
from __future__ import annotations

import torch
from torch import nn

from pagedray.kernels import ops
from pagedray.models.layers.distributed import tp_all_gather
from pagedray.models.layers.vocab_embedding import VocabParallelEmbedding


class LogitsProcessor(nn.Module):
    """Applies a (possibly tied) vocab-parallel head, gathers the shards and drops the padding.

    `scale` multiplies the logits, `soft_cap` applies cap * tanh(logits / cap)
    (Gemma 2 style). Logits come back in float32 for the sampler.
    """

    def __init__(self, vocab_size: int, scale: float = 1.0, soft_cap: float | None = None) -> None:
        super().__init__()
        self.vocab_size, self.scale, self.soft_cap = vocab_size, scale, soft_cap

    def forward(self, lm_head: VocabParallelEmbedding, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(hidden_states, lm_head.weight, getattr(lm_head, "bias", None))
        logits = tp_all_gather(logits, dim=-1)[..., :self.vocab_size].float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.soft_cap:
            logits = self.soft_cap * torch.tanh(logits / self.soft_cap)
        return logits
