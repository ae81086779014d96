"""Embedding and LM head with the vocabulary split over tensor-parallel ranks.

The vocabulary is padded to a multiple of `padding_size * tp_size` so every
rank holds the same number of rows; padded rows are zero and their logits are
cut off after the all-gather.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedray.models.layers.distributed import get_tp_rank, get_tp_world_size, tp_all_reduce
from pagedray.models.layers.weights import WeightLike, check_shape, narrow, set_weight_loader

DEFAULT_VOCAB_PADDING_SIZE = 64


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r*n, (r+1)*n) of the padded table; lookups outside it give 0 before the all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_world_size()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, padding_size * self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim), requires_grad=False)
        self.weight = set_weight_loader(weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: WeightLike, shard_id=None) -> None:
        """Keep this rank's rows of the full [vocab, ...] tensor (weight or bias); zero the padding."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes no shard_id, got {shard_id!r}")
        check_shape(loaded_weight, (self.num_embeddings, *param.shape[1:]))
        real_rows = max(0, min(self.vocab_end_index, self.num_embeddings) - self.vocab_start_index)
        param.data[real_rows:].zero_()
        if real_rows:
            param.data[:real_rows].copy_(narrow(loaded_weight, 0, self.vocab_start_index, real_rows))

    def extra_repr(self) -> str:
        return (f"vocab={self.num_embeddings}, padded={self.num_embeddings_padded}, dim={self.embedding_dim}, "
                f"rows=[{self.vocab_start_index}, {self.vocab_end_index})")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local_ids = torch.where(mine, input_ids - self.vocab_start_index, 0)
        out = F.embedding(local_ids, self.weight)
        out.masked_fill_(~mine.unsqueeze(-1), 0)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded like the embedding; logits come from `LogitsProcessor`."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False,
                 padding_size: int = DEFAULT_VOCAB_PADDING_SIZE) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_size)
        if bias:
            b = nn.Parameter(torch.empty(self.num_embeddings_per_partition), requires_grad=False)
            self.bias = set_weight_loader(b, self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def forward(self, *args, **kwargs):
        raise RuntimeError("ParallelLMHead is applied through LogitsProcessor, not called directly")
