"""The paged attention layer every model uses in place of its HF attention op."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pagedray.kernels import ops

if TYPE_CHECKING:
    from pagedray.models.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """How one step's flat tokens map onto sequences and cache slots.

    Built once per step by the ModelRunner and shared by every layer.
    """
    slot_mapping: torch.Tensor      # [T] int64: cache slot of each new token (-1: skip)
    block_tables: torch.Tensor      # [S, max_blocks] int32
    seq_lens: torch.Tensor          # [S] int32: context length incl. this step's tokens
    query_start_loc: torch.Tensor   # [S+1] int32: row offsets of each sequence in the flat batch
    seq_lens_list: list[int]        # the same on the host, to avoid device syncs
    query_lens_list: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_list)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class Attention(nn.Module):
    """Writes this step's K/V into the paged cache and attends through the block table.

    kv_cache: [2, num_blocks, num_kv_heads, block_size, head_size] for this layer,
    or an empty tensor during memory profiling (then attention runs on the fresh
    K/V only, each sequence's prompt being new).
    """

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 sliding_window: int | None = None, alibi_slopes: torch.Tensor | None = None,
                 logits_soft_cap: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = scale
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        # Per-tensor scales of an FP8 KV cache (1.0 unless the checkpoint has k_scale / v_scale).
        self.kv_scales = (1.0, 1.0)
        if alibi_slopes is not None:
            self.register_buffer("alibi_slopes", alibi_slopes.float(), persistent=False)
        else:
            self.alibi_slopes = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata,
                rotary: RotaryEmbedding | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, H*D], key/value [T, Hkv*D] -> [T, H*D].

        With `rotary`, query and key are rotated here first (at `positions`): into the cache write
        as one kernel where the cache exists (ops.rotary_and_cache), as rotary then write otherwise.
        """
        num_tokens = query.shape[0]
        q = query.view(num_tokens, self.num_heads, self.head_size)
        k = key.view(num_tokens, self.num_kv_heads, self.head_size)
        v = value.view(num_tokens, self.num_kv_heads, self.head_size)
        if kv_cache.numel() == 0:
            if rotary is not None:
                q, k = rotary(positions, q, k)
            out = self._attend_fresh(q, k, v, attn_metadata)
        else:
            k_scale, v_scale = self.kv_scales
            # The prefill kernel may read this step's K/V from k/v (then k must be the rotated key).
            step_kv = not attn_metadata.is_decode_only and ops.prefill_reads_step_kv(q)
            if rotary is not None and not step_kv:
                q = ops.rotary_and_cache(positions, q, k, v, rotary.cos_sin_cache, rotary.is_neox_style,
                                         kv_cache[0], kv_cache[1], attn_metadata.slot_mapping, k_scale, v_scale)
            else:
                if rotary is not None:
                    q, k = rotary(positions, q, k)
                ops.reshape_and_cache(k, v, kv_cache[0], kv_cache[1], attn_metadata.slot_mapping, k_scale, v_scale)
            out = ops.paged_attention(q, kv_cache[0], kv_cache[1], attn_metadata.block_tables,
                                      attn_metadata.seq_lens_list, attn_metadata.query_lens_list,
                                      self.scale, self.sliding_window, self.alibi_slopes,
                                      self.logits_soft_cap, seq_lens_tensor=attn_metadata.seq_lens,
                                      k_scale=k_scale, v_scale=v_scale, key=k if step_kv else None,
                                      value=v if step_kv else None)
        return out.reshape(num_tokens, self.num_heads * self.head_size)

    def _attend_fresh(self, q, k, v, attn_metadata: AttentionMetadata) -> torch.Tensor:
        from pagedray.kernels.reference import attend
        out = torch.empty_like(q)
        start = 0
        for q_len in attn_metadata.query_lens_list:
            end = start + q_len
            out[start:end] = attend(q[start:end], k[start:end], v[start:end], self.scale,
                                    self.sliding_window, self.alibi_slopes, self.logits_soft_cap)
            start = end
        return out
