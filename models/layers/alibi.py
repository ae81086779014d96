"""ALiBi (attention with linear biases): per-head slopes for the paged Attention layer.

Attention adds slope_h * (key_pos - query_pos) to the scores; BLOOM and MPT
add slope_h * key_pos, which differs by a per-query constant that softmax
cancels. No position embedding is used with ALiBi.
"""
from __future__ import annotations

import math

import torch

from pagedray.models.layers.distributed import divide, get_tp_rank, get_tp_world_size


def alibi_slopes(total_num_heads: int) -> torch.Tensor:
    """The geometric slopes of the ALiBi paper, float32 [total_num_heads].

    For n heads with n a power of two: 2^(-8/n), 2^(-16/n), ...; otherwise the
    slopes of the nearest lower power of two, then every other slope of the
    next power of two, as in the paper's reference code.
    """
    if total_num_heads < 1:
        raise ValueError(f"total_num_heads must be >= 1, got {total_num_heads}")
    pow2 = 2 ** math.floor(math.log2(total_num_heads))
    base = 2.0 ** (-8.0 / pow2)
    slopes = [base ** (i + 1) for i in range(pow2)]
    if pow2 < total_num_heads:
        extra_base = 2.0 ** (-4.0 / pow2)  # 2^(-8 / (2 * pow2))
        slopes += [extra_base ** (2 * i + 1) for i in range(total_num_heads - pow2)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_slopes_for_rank(total_num_heads: int) -> torch.Tensor:
    """This tensor-parallel rank's slice of the slopes (its query heads are a contiguous block)."""
    per_rank = divide(total_num_heads, get_tp_world_size(), "num_attention_heads")
    start = get_tp_rank() * per_rank
    return alibi_slopes(total_num_heads)[start:start + per_rank]
